"""ServerApp: compose the config, build the strategy, run the rounds, write the results."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import Grid, ServerApp, ServerConfig
from flwr.server.compat import start_grid

from app.config import ExperimentConfig, load_config, parse_overrides
from app.he_context import (
    HE_SECRET_PATH_KEY,
    PUBLIC_FILE,
    SECRET_FILE,
    HEContext,
    HEError,
    is_payload,
    load_context,
)
from app.data import centralized_test_split, data_spec
from app.evaluation import evaluate, resolve_device
from app.edge_model import export_int8
from app.experiment_server import ExperimentServer, NodeTrackingClientManager
from app.finetune import build_finetune_model, merged_model
from app.models import get_weights, num_parameters, set_weights
from app.results import RunRecorder
from strategies.factory import build_strategy

DEFAULT_RUNS_ROOT = Path.home() / "flower-private-finetune" / "runs"


def resolve_output_dir(cfg: ExperimentConfig, run_id: int) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    return DEFAULT_RUNS_ROOT / f"{datetime.now():%Y%m%d-%H%M%S}-run{run_id}"


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


def prepare_he_keys(cfg: ExperimentConfig, overrides: str, output_dir: Path) -> tuple[HEContext, dict]:
    """The server's public HE context, and what clients must be told about keys.

    Deployment (`secagg.public_context` set): load that file; SuperNodes name their secret
    context in their node config. Simulation: provision fresh keys into <output_dir>/keys in a
    child process (so no secret key is ever in this process) and tell the simulated clients
    where the secret context lies."""
    if cfg.secagg.public_context:
        context = load_context(cfg.secagg.public_context)
        if context.is_secret:
            raise HEError(
                f"secagg.public_context={cfg.secagg.public_context} holds a secret key: give "
                f"the server {PUBLIC_FILE}, never {SECRET_FILE}"
            )
        return context, {}
    keys = output_dir / "keys"
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
    started = time.perf_counter()
    overrides = str(context.run_config.get("overrides", ""))
    cfg = load_config(overrides)
    warn_if_runtime_environment()
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    output_dir = resolve_output_dir(cfg, context.run_id)
    recorder = RunRecorder(output_dir, cfg)

    spec = data_spec(cfg.dataset)
    test_data = centralized_test_split(cfg.dataset, cfg.seed)
    device = resolve_device(cfg.training.device)
    # Fine-tuning: both start from the checkpoint; only `wire` tensors travel (app/finetune.py).
    model, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    eval_model = build_finetune_model(cfg.model, spec, seed=cfg.seed)[0].to(device)

    def evaluate_centrally(server_round, weights, config):
        set_weights(eval_model, weights, wire)
        metrics = evaluate(eval_model, test_data, spec.task, device)
        return metrics.pop("loss"), metrics

    he_context, he_client_config = (
        prepare_he_keys(cfg, overrides, output_dir) if cfg.secagg.name == "he" else (None, None)
    )
    strategy = build_strategy(
        cfg,
        ndarrays_to_parameters(get_weights(model, wire)),
        evaluate_fn=evaluate_centrally,
        he_context=he_context,
        he_client_config=he_client_config,
    )
    nodes = len(list(grid.get_node_ids()))
    log(
        INFO,
        "Experiment: dataset=%s partitioner=%s model=%s (%d parameters) strategy=%s, "
        "privacy=%s secagg=%s, %d rounds, %d SuperNodes connected, results -> %s",
        cfg.dataset.name,
        cfg.partitioner.name,
        cfg.model.name,
        num_parameters(model),
        cfg.strategy.name,
        cfg.privacy.name,
        cfg.secagg.name,
        cfg.num_rounds,
        nodes,
        output_dir,
    )
    if nodes < cfg.strategy.min_available_clients:
        log(
            WARNING,
            "%d SuperNodes connected but strategy.min_available_clients=%d: rounds wait for "
            "more nodes. In simulation: flwr run . --federation-config 'num-supernodes=%d'",
            nodes,
            cfg.strategy.min_available_clients,
            cfg.simulation.num_supernodes,
        )

    server = ExperimentServer(
        client_manager=NodeTrackingClientManager(), strategy=strategy, recorder=recorder
    )
    start_grid(grid=grid, server=server, config=ServerConfig(num_rounds=cfg.num_rounds))

    final_arrays = parameters_to_ndarrays(server.parameters)
    encrypted = final_arrays if is_payload(final_arrays) else None
    if encrypted is None:
        set_weights(model, final_arrays, wire)
    # LoRA: the deployable model has the adapters merged into the base layers (app/finetune.py).
    deployable = merged_model(model)
    rounds = recorder.rounds
    final: dict = {
        "rounds_completed": server.rounds_completed,
        "stop_reason": server.stop_reason,
        "num_parameters": num_parameters(deployable),
        "num_trainable_parameters": sum(a.size for a in get_weights(model, wire)),
        "num_supernodes": nodes,
        "seconds_total": time.perf_counter() - started,
        "comm_total": {
            "bytes_down": sum(r["comm"]["bytes_down"] for r in rounds),
            "bytes_up": sum(r["comm"]["bytes_up"] for r in rounds),
        },
    }
    lost = [r["round"] for r in rounds if r["clients"].get("failures")]
    if lost:
        final["rounds_with_failures"] = lost
    for scope in ("centralized", "federated", "privacy"):
        last = next((r[scope] for r in reversed(rounds) if scope in r), None)
        if last is not None:
            final[scope] = last
    if encrypted is None:
        # Edge inference copy (app/edge_model.py); evaluated on CPU, where int8 kernels run.
        cpu = torch.device("cpu")
        final["int8_model"] = export_int8(
            deployable,
            output_dir,
            lambda m: evaluate(m, test_data, spec.task, cpu),
        )
    he_rounds = [r["secagg"] for r in rounds if "bytes_per_parameter_up" in r.get("secagg", {})]
    if he_rounds:
        final["secagg"] = he_rounds[-1]
    recorder.finish(final, None if encrypted else deployable, encrypted_model=encrypted)
    # Under HE the server cannot evaluate the final model: report the federated evaluation.
    evaluated = "" if "centralized" in final else "federated "
    summary = " | ".join(
        [f"{server.rounds_completed} rounds ({server.stop_reason})"]
        + [
            f"{evaluated}{k} {v:.4f}"
            for k, v in final.get("centralized", final.get("federated", {})).items()
        ]
        + (
            [f"epsilon {final['privacy']['epsilon']:.3f} (delta {final['privacy']['delta']:g})"]
            if "privacy" in final
            else []
        )
        + [f"{final['seconds_total']:.1f} s"]
    )
    log(INFO, "Finished: %s", summary)
    log(INFO, "Results in %s", output_dir)
    print(f"Results in {output_dir}", flush=True)
