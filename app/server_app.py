"""ServerApp: compose the config, build the strategy, run the rounds, write the results.

A run that fails (a bad config, too few SuperNodes, no round aggregating any update, any
exception) is marked `failed` in results.json with a one-line reason, writes no model, and
re-raises so that Flower records it as `finished:failed` (`flwr ls`). `flwr run` itself exits 0
either way: scripts check `flwr ls --run-id <id> --format json` or results.json (app.sweep and
run_experiment do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.common import Context, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import Grid, ServerApp, ServerConfig
from flwr.server.compat import start_grid

from app.config import load_config
from app.grid_messages import PULL_INTERVAL_S, CollectingGrid
from core.config import ConfigError, ExperimentConfig, parse_overrides, resolved_yaml
from protections.he.context import (
    HE_SECRET_PATH_KEY,
    PUBLIC_FILE,
    SECRET_FILE,
    HEContext,
    HEError,
    is_payload,
    load_context,
)
from core.data import centralized_evaluation_data, check_partition_count, data_spec
from core.evaluation import evaluate, resolve_device
from core.edge_model import export_int8
from app.experiment_server import (
    CONSOLE_METRICS,
    ClientWaitTimeout,
    ExperimentServer,
    NodeTrackingClientManager,
    client_wait_message,
    partition_ids_by_registration,
)
from core.finetune import build_finetune_model, merged_model
from core.models import get_weights, num_parameters, set_weights
from app.checkpoint import CheckpointError, check_resumable
from app.checkpoint import load as load_checkpoint
from app.checkpoint import save as save_checkpoint
from core.results import Comm, FinalRecord, Int8Model, RunRecorder
from app.tracking import resumed_tracking_id, start_tracking
from strategies.factory import build_strategy, evaluates_with_train, has_federated_evaluation

DEFAULT_RUNS_ROOT = Path.home() / "flower-private-finetune" / "runs"
LATEST_LINK = "latest"  # <runs root>/latest -> the newest run directory under it
RUN_TOKEN_KEY = "run-token"  # run config (pyproject.toml): set by app.sweep / run_experiment
SWEEP_DIR_KEY = "sweep-dir"  # run config: set by app.sweep for a sweep's jobs (MLflow tag `sweep`)
# Run config, for benchmarks/deployment_round.py's `before` run only: true sends the rounds'
# messages through Flower's Grid as shipped (HttpGrid: a 3 s sleep between pulls) instead of
# app/grid_messages.py's collector.
SHIPPED_GRID_KEY = "shipped-grid"
# strategy.client_wait_timeout_s=null. Deployment: how long a wait for enough SuperNodes
# lasts before the run fails.
NODE_WAIT_S = 600.0
# Simulation: Flower registers every node while the ServerApp loads (a race it wins by seconds).
SIMULATION_NODE_WAIT_S = 10.0


def resolve_output_dir(cfg: ExperimentConfig, run_id: int) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    return DEFAULT_RUNS_ROOT / f"{datetime.now():%Y%m%d-%H%M%S}-run{run_id}"


def point_latest(runs_root: Path, run_dir: Path) -> Path:
    """Make `<runs_root>/latest` a symlink to `run_dir`, atomically: a temporary link is
    renamed over the old one (os.replace), so a reader always finds a complete link, either
    the previous run's or this one's. The target is relative, so the tree can be moved."""
    runs_root.mkdir(parents=True, exist_ok=True)
    link = runs_root / LATEST_LINK
    temporary = runs_root / f".{LATEST_LINK}.{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    os.symlink(os.path.relpath(run_dir, runs_root), temporary)
    os.replace(temporary, link)
    return link


def client_wait_timeout(cfg: ExperimentConfig, simulation: bool) -> float:
    """strategy.client_wait_timeout_s, or its default for this kind of federation."""
    if cfg.strategy.client_wait_timeout_s is not None:
        return float(cfg.strategy.client_wait_timeout_s)
    return SIMULATION_NODE_WAIT_S if simulation else NODE_WAIT_S


def warn_if_runtime_environment() -> None:
    """Flower's SuperLink installs the app's dependencies into a fresh per-run virtualenv
    unless told not to; for this app that means re-downloading torch (GBs) on every run."""
    venv = os.environ.get("VIRTUAL_ENV", "")
    if f"{os.sep}runtime-envs{os.sep}" in venv:
        log(
            WARNING,
            "This run executes in a per-run environment that Flower built by installing the "
            "app's dependencies (%s). The package is already installed: start the SuperLink "
            "with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (see README, 'No downloads "
            "at run time'): stop the SuperLink started without it (pkill -f flower-superlink) and run again.",
            venv,
        )


def prepare_he_keys(
    cfg: ExperimentConfig, overrides: str, output_dir: Path, *, resume: bool = False
) -> tuple[HEContext, dict]:
    """The server's public HE context, and what clients must be told about keys.

    Deployment (`secagg.public_context` set): load that file; SuperNodes name their secret
    context in their node config. Simulation: provision fresh keys into <output_dir>/keys in a
    child process (so no secret key is ever in this process) and tell the simulated clients
    where the secret context lies; a resumed run (`resume`) reuses the keys already there,
    under which its checkpointed model is encrypted."""
    if cfg.secagg.public_context:
        context = load_context(cfg.secagg.public_context)
        if context.is_secret:
            raise HEError(
                f"secagg.public_context={cfg.secagg.public_context} holds a secret key: give "
                f"the server {PUBLIC_FILE}, never {SECRET_FILE}"
            )
        return context, {}
    keys = output_dir / "keys"
    if resume:
        if not (keys / PUBLIC_FILE).exists() or not (keys / SECRET_FILE).exists():
            raise HEError(
                f"resume=true under secagg=he needs the first run's keys in {keys} ({PUBLIC_FILE} "
                f"and {SECRET_FILE}): the checkpointed model is encrypted under them. Put them "
                "back, or start a new run"
            )
        context = load_context(keys / PUBLIC_FILE)
        if context.is_secret:
            raise HEError(f"{keys / PUBLIC_FILE} holds a secret key: put the first run's {PUBLIC_FILE} back, "
                          f"never a copy of {SECRET_FILE}")  # fmt: skip
        log(INFO, "HE keys of the first run reused from %s", keys)
        return context, {HE_SECRET_PATH_KEY: str(keys / SECRET_FILE)}
    proc = subprocess.run(
        [sys.executable, "-m", "app.he_keys", "provision", "--out", str(keys),
         *parse_overrides(overrides)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise HEError(f"HE key provisioning failed: {proc.stderr.strip()[-2000:]}")
    log(INFO, "HE keys provisioned for this simulation in %s", keys)
    return load_context(keys / PUBLIC_FILE), {HE_SECRET_PATH_KEY: str(keys / SECRET_FILE)}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = str(context.run_config.get("overrides", ""))
    try:
        cfg = load_config(overrides)
    except ConfigError as err:
        # One clean line in the log; the exception then fails the run (finished:failed).
        log(ERROR, "%s", err)
        raise
    output_dir = resolve_output_dir(cfg, context.run_id)
    resume = None
    if cfg.resume:
        try:
            resume = load_checkpoint(output_dir)
            check_resumable(resume, cfg, resolved_yaml(cfg))
        except CheckpointError as err:
            log(ERROR, "%s", err)
            raise
    token = str(context.run_config.get(RUN_TOKEN_KEY, ""))
    tracker = start_tracking(
        cfg, DEFAULT_RUNS_ROOT, output_dir, token=token, flwr_run_id=context.run_id,
        sweep_dir=str(context.run_config.get(SWEEP_DIR_KEY, "")),
        resumed_from=None if resume is None else resumed_tracking_id(resume.results),
    )  # fmt: skip
    recorder = RunRecorder(
        output_dir, cfg, token=token, flwr_run_id=context.run_id,
        resumed=None if resume is None else resume.results, observer=tracker,
    )  # fmt: skip
    if not cfg.output_dir:  # under the runs root: it is the newest run there
        point_latest(DEFAULT_RUNS_ROOT, output_dir)
    if recorder.archived is not None:
        log(WARNING, "%s held an earlier run's results: moved them to %s",
            output_dir, recorder.archived)  # fmt: skip
        # A simulation under HE provisions new keys into output_dir/keys: the earlier run's,
        # which its archived encrypted model needs, go with it instead of being overwritten.
        if cfg.secagg.name == "he" and not cfg.secagg.public_context and (output_dir / "keys").is_dir():
            (output_dir / "keys").rename(recorder.archived / "keys")
    try:
        run(grid, context, cfg, overrides, output_dir, recorder, resume)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        recorder.fail(reason)
        log(ERROR, "Run failed: %s", reason)
        raise


def wait_for_nodes(grid: Grid, cfg: ExperimentConfig) -> int:
    """The number of SuperNodes, once there are enough for the strategy's minimums; raise
    ClientWaitTimeout with the numbers and the keys to change when there are not within
    strategy.client_wait_timeout_s (client_wait_timeout). Flower's own sampling would
    otherwise wait up to 24 h or stop after 0 rounds."""
    s = cfg.strategy
    needed = {"min_train_clients": s.min_train_clients, "min_available_clients": s.min_available_clients}
    if has_federated_evaluation(cfg):
        needed["min_evaluate_clients"] = s.min_evaluate_clients
    key, want = max(needed.items(), key=lambda kv: kv[1])
    simulation = type(grid).__name__ == "InMemoryGrid"
    wait_s = client_wait_timeout(cfg, simulation)
    deadline = time.monotonic() + wait_s
    nodes = len(list(grid.get_node_ids()))
    if nodes < want and not simulation:
        log(INFO, "%d SuperNodes connected, strategy.%s=%d: waiting up to %.0f s for more",
            nodes, key, want, wait_s)  # fmt: skip
    while nodes < want and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = len(list(grid.get_node_ids()))
    if nodes < want:
        message = client_wait_message(wait_s, want, nodes, key)
        if simulation:
            message += f"; in simulation: flwr run . --federation-config 'num-supernodes={want}'"
        raise ClientWaitTimeout(f"strategy.{key}={want} but the federation has {nodes} SuperNodes: {message}")
    return nodes


def start_line(cfg: ExperimentConfig, nodes: int, parameters: int, output_dir: Path, simulation: bool) -> str:
    """What runs, in one line, before round 1 (from the config and the connected nodes)."""
    kind = "simulation" if simulation else "deployment"
    sampling = (
        f"cohorts seeded (seed={cfg.seed})" if cfg.privacy.name == "none"
        else "cohorts from the OS CSPRNG (privacy)"
    )  # fmt: skip
    return (
        f"Experiment: {kind} of {nodes} SuperNodes, {cfg.num_rounds} rounds, "
        f"strategy={cfg.strategy.name} privacy={cfg.privacy.name} secagg={cfg.secagg.name}, "
        f"dataset={cfg.dataset.name} partitioner={cfg.partitioner.name} model={cfg.model.name} "
        f"({parameters} parameters), {sampling}, results -> {output_dir}"
    )


def federation_mismatch(cfg: ExperimentConfig, nodes: int) -> str | None:
    """The warning when the simulation that runs is not the one simulation.num_supernodes
    describes (a plain `flwr run .` takes its size from pyproject.toml or --federation-config)."""
    if nodes == cfg.simulation.num_supernodes:
        return None
    return (
        f"{nodes} SuperNodes connected but simulation.num_supernodes={cfg.simulation.num_supernodes}: "
        f"this run uses {nodes} partitions (config.yaml records {nodes}); to run the configured "
        f"size use python -m app.sweep, or flwr run . --federation-config "
        f"'num-supernodes={cfg.simulation.num_supernodes}'"
    )


# Flower's simulation engine hands messages to clients in sweeps: every 0.1 s it asks the
# in-memory link state for each node's next message, and each ask scans every message in
# flight (flwr/server/superlink/fleet/vce/vce_api.py:168-180 `add_messages_to_queue`,
# flwr/server/superlink/linkstate/in_memory_linkstate.py:239-264 `get_message_ins`). One sweep
# costs about N nodes x M messages x 2-5 us (`python -m benchmarks.scale --sweep-only` on two
# shared cores: 1.2-2.9 s at N=1,000 and M=500, 0.3-0.6 s at N=10,000 and M=10). Past this many
# node-message checks a sweep (0.4-1 s) the ServerApp warns, naming the key that sets M.
DISPATCH_CHECKS_WARN = 200_000
SUGGESTED_COHORT = 10  # clients a round in the suggestion (what benchmarks/scale.py runs)


def dispatch_warnings(cfg: ExperimentConfig, nodes: int) -> list[str]:
    """One warning per stage (train, evaluate) whose messages in flight at once, times the
    simulation's `nodes`, reach DISPATCH_CHECKS_WARN. Messages per stage as Flower's FedAvg
    samples: max(int(nodes * fraction), min clients), at most `nodes`."""
    s = cfg.strategy
    stages = [("train", "fraction_train", s.fraction_train, "min_train_clients", s.min_train_clients)]
    if has_federated_evaluation(cfg):
        stages.append(("evaluate", "fraction_evaluate", s.fraction_evaluate,
                       "min_evaluate_clients", s.min_evaluate_clients))  # fmt: skip
    warnings = []
    for stage, fraction_key, fraction, min_key, minimum in stages:
        messages = min(nodes, max(int(nodes * fraction), minimum))
        checks = nodes * messages
        if checks < DISPATCH_CHECKS_WARN:
            continue
        most = max(1, (DISPATCH_CHECKS_WARN - 1) // nodes)
        k = min(SUGGESTED_COHORT, most)
        by_min = int(nodes * fraction) < minimum
        cause = f"strategy.{min_key}={minimum}" if by_min else f"strategy.{fraction_key}={fraction:g}"
        fix = f"strategy.{min_key}={k}" if by_min else (
            f"strategy.{fraction_key}={k / nodes:g} ({k} clients a round)"
            + (f" with strategy.{min_key}<={k}" if minimum > k else "")
        )  # fmt: skip
        if stage == "evaluate":
            fix += f", or strategy.{fraction_key}=0 (no federated evaluation)"
        warnings.append(
            f"Large simulation: {cause} puts {messages} {stage} messages in flight at once "
            f"among {nodes} SuperNodes. Flower's simulation engine scans every message in flight "
            f"for every node on each dispatch sweep, and each message waits for a sweep: "
            f"{nodes} x {messages} = {checks:,} checks, {checks * 2e-6:.1f}-{checks * 5e-6:.1f} s "
            f"a sweep at the 2-5 us a check measured by benchmarks/scale.py. Keep SuperNodes x "
            f"messages under {DISPATCH_CHECKS_WARN:,} (at most {most} clients here): {fix}"
        )
    return warnings


def federated_evaluation_every(cfg: ExperimentConfig) -> int | None:
    """strategy.evaluate_every when the run has federated evaluation (fraction_evaluate > 0,
    clients hold a validation split, and privacy allows its metrics), else None: no round
    then records a skipped federated evaluation."""
    return cfg.strategy.evaluate_every if has_federated_evaluation(cfg) else None


def shipped_grid(context: Context) -> bool:
    """The run config's `shipped-grid` (absent: false), as a bool."""
    value = context.run_config.get(SHIPPED_GRID_KEY, False)
    if isinstance(value, str):
        value = value.strip().lower()
        if value not in ("true", "false", ""):
            raise ConfigError(f"run config {SHIPPED_GRID_KEY}={value!r}: use true or false")
        return value == "true"
    return bool(value)


def run(grid, context, cfg, overrides, output_dir, recorder, resume=None) -> None:
    started = time.perf_counter()
    warn_if_runtime_environment()
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    nodes = wait_for_nodes(grid, cfg)
    simulation = type(grid).__name__ == "InMemoryGrid"
    if simulation:  # one partition per SuperNode
        check_partition_count(cfg.dataset, nodes, cfg.seed)
        mismatch = federation_mismatch(cfg, nodes)
        if mismatch:
            log(WARNING, "%s", mismatch)
        for warning in dispatch_warnings(cfg, nodes):
            log(WARNING, "%s", warning)
    if cfg.evaluation.per_site and cfg.privacy.name != "none":
        log(WARNING, "evaluation.per_site=true under privacy=%s: each site's own federated "
            "metrics go to results.json, and they are not covered by the DP guarantee (they are "
            "computed on the site's data after the model)", cfg.privacy.name)  # fmt: skip
    # config.yaml records the federation that ran (simulation.num_supernodes = the nodes).
    ran = replace(cfg, simulation=replace(cfg.simulation, num_supernodes=nodes))
    recorder.write_config(ran)

    spec = data_spec(cfg.dataset)
    # None: the server holds no data (dataset=tabular without test_path): no centralized evaluation
    test_data = centralized_evaluation_data(cfg.dataset, cfg.seed)
    device = resolve_device(cfg.training.device)
    # Fine-tuning: both start from the checkpoint; only `wire` tensors travel (core/finetune.py).
    model, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    eval_model = build_finetune_model(cfg.model, spec, seed=cfg.seed)[0].to(device)

    def evaluate_centrally(server_round, weights, config):
        set_weights(eval_model, weights, wire)
        metrics = evaluate(eval_model, test_data, spec.task, device, threshold=cfg.evaluation.threshold,
                           calibration_bins=cfg.evaluation.calibration_bins)  # fmt: skip
        return metrics.pop("loss"), metrics

    he_context, he_client_config = (
        prepare_he_keys(cfg, overrides, output_dir, resume=resume is not None)
        if cfg.secagg.name == "he"
        else (None, None)
    )
    strategy = build_strategy(
        cfg,
        ndarrays_to_parameters(get_weights(model, wire)),
        evaluate_fn=evaluate_centrally if test_data is not None else None,
        he_context=he_context,
        he_client_config=he_client_config,
    )
    log(INFO, "%s", start_line(cfg, nodes, num_parameters(model), output_dir, simulation))

    config_yaml = resolved_yaml(cfg)

    def checkpoint(server_round, arrays, strategy_state, pending=None):
        results = recorder.results
        if pending is not None:  # written before the round ends (ExperimentServer): it counts as done
            results = {**results, "rounds": [*results.get("rounds", []), pending.to_dict()]}
        save_checkpoint(output_dir, server_round, arrays, strategy_state, results, config_yaml)

    server = ExperimentServer(
        client_manager=NodeTrackingClientManager(
            # Seeded cohorts only without DP (a DP cohort is PrivateCohort's, never seeded).
            seed=cfg.seed if cfg.privacy.name == "none" else None,
            wait_timeout_s=client_wait_timeout(cfg, simulation),
            # Simulation: partition ids from the registration order, not one message a node.
            known_partition_ids=(
                (lambda: partition_ids_by_registration(grid.get_nodes())) if simulation else None
            ),
        ),
        strategy=strategy, recorder=recorder,
        checkpoint_fn=checkpoint, resume=resume,
        per_site_metrics=cfg.evaluation.per_site_enabled(cfg.privacy.name),
        evaluate_every=federated_evaluation_every(cfg),
        evaluate_with_train=evaluates_with_train(cfg),
    )  # fmt: skip
    # Deployment: replies collected every 0.1 s (app/grid_messages.py); the simulation's
    # InMemoryGrid already pulls every 0.1 s.
    collecting = not simulation and not shipped_grid(context)
    round_grid = CollectingGrid(grid) if collecting else grid
    if not simulation:
        log(INFO, "%s", f"replies collected every {PULL_INTERVAL_S:g} s (app/grid_messages.py)"
            if collecting else f"{SHIPPED_GRID_KEY}=true: Flower's Grid as shipped (3 s between pulls)")  # fmt: skip
    try:
        start_grid(grid=round_grid, server=server, config=ServerConfig(num_rounds=cfg.num_rounds))
    finally:
        if collecting:
            round_grid.close()  # the poller thread ends with the rounds
    server.check_trained()  # RunFailed when no round aggregated anything: no model is written

    summary = finish_run(
        server, recorder, model, wire, nodes, started, output_dir,
        None if test_data is None else lambda m: evaluate(
            m, test_data, spec.task, torch.device("cpu"), threshold=cfg.evaluation.threshold,
            calibration_bins=cfg.evaluation.calibration_bins,
        ),  # fmt: skip
    )  # fmt: skip
    log(INFO, "Finished: %s", summary)
    log(INFO, "Results in %s", output_dir)
    print(f"Results in {output_dir}", flush=True)


def finish_run(server, recorder, model, wire, nodes, started, output_dir, evaluate_int8) -> str:
    """After the last round: load the final global model into `model`, write the run's
    `final` (core/result_types.py FinalRecord) and its model files through the recorder, and
    return the summary line. `evaluate_int8(model)`: metrics of the int8 copy (on CPU)."""
    final_arrays = list(server.strategy.global_model.arrays(server.parameters))
    encrypted = final_arrays if is_payload(final_arrays) else None
    if encrypted is None:
        set_weights(model, final_arrays, wire)
    # LoRA: the deployable model has the adapters merged into the base layers (core/finetune.py).
    deployable = merged_model(model)
    rounds = recorder.record.rounds
    final = FinalRecord(
        rounds_completed=server.rounds_completed,
        stop_reason=server.stop_reason,
        num_parameters=num_parameters(deployable),
        num_trainable_parameters=sum(a.size for a in get_weights(model, wire)),
        num_supernodes=nodes,
        seconds_total=time.perf_counter() - started,
        comm_total=Comm(
            bytes_down=sum(r.comm.bytes_down for r in rounds if r.comm is not None),
            bytes_up=sum(r.comm.bytes_up for r in rounds if r.comm is not None),
        ),
    )
    final.rounds_with_failures = [
        r.round for r in rounds if r.clients is not None and r.clients.failures
    ] or None
    for scope in ("centralized", "federated", "privacy"):
        last = next((getattr(r, scope) for r in reversed(rounds) if getattr(r, scope) is not None), None)
        setattr(final, scope, last)
    if encrypted is None:
        # Edge inference copy (core/edge_model.py); evaluated on CPU, where int8 kernels run.
        final.int8_model = Int8Model.from_dict(export_int8(deployable, output_dir, evaluate_int8))
    he_rounds = [
        r.secagg for r in rounds if r.secagg is not None and r.secagg.bytes_per_parameter_up is not None
    ]
    if he_rounds:
        final.secagg = he_rounds[-1]
    recorder.finish(final, None if encrypted else deployable, encrypted_model=encrypted)
    # Under HE the server cannot evaluate the final model: report the federated evaluation.
    evaluated = "" if final.centralized is not None else "federated "
    shown = final.centralized if final.centralized is not None else final.federated or {}
    summary = " | ".join(
        [f"{server.rounds_completed} rounds ({server.stop_reason})"]
        + [f"{evaluated}{k} {shown[k]:.4f}" for k in CONSOLE_METRICS if k in shown]
        + (
            [f"epsilon {final.privacy.epsilon:.3f} (delta {final.privacy.delta:g})"]
            if final.privacy is not None
            else []
        )
        + [f"{final.seconds_total:.1f} s"]
    )
    return summary
