"""Hydra CLI: each job is a full Flower simulation (`flwr run`) with its own output directory.

    python -m app.sweep model=cnn num_rounds=5                # one run
    python -m app.sweep -m strategy=fedavg,fedprox seed=0,1   # a sweep of four runs

Every job validates its configuration first (a bad override fails before anything starts),
then launches `flwr run <project> --stream` with the job's overrides, the federation size
from `simulation.*`, and `output_dir` set to Hydra's job directory. In a sweep, the sweep
directory gets `summary.csv` with the final metrics of every job, rewritten after each job,
and, once a configuration has run with two or more seeds (`-m strategy=fedavg,fedprox
seed=0,1,2`), `summary_by_config.csv`: one row per configuration (the overrides without
`seed=`) with its seeds, how many jobs were ok and failed, and the mean and sample standard
deviation of every final metric over its ok jobs (failed jobs are counted, never averaged).
Each job's MLflow run (app/tracking.py) gets the tag `sweep` with the sweep directory.

Success is checked, not assumed: `flwr run` exits 0 even for a failed run, so a job is `ok`
only when Flower reports its run `finished:completed` (`flwr ls --run-id <id> --format json`)
and `results.json` carries this job's run token (a fresh one per job, passed through the run
config) with status `completed`. Anything else is a failed job: a one-line reason is printed,
written to the job's `status.json` and its `summary.csv` row, and `python -m app.sweep` exits 1
once every job has run. `simulation.job_timeout_s` bounds each job: past it the run is stopped
on the SuperLink (`flwr stop`), `flwr run` is ended, and the job fails "timed out after N s".
Artifacts an earlier run left in the job's directory are moved to
`previous/` first (core/results.py), so they are never reported as this job's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.config import load_config, to_experiment_config  # registers the option schemas
from app.fab import PROJECT_DIR, stage_app
from core.config import CONF_DIR, ConfigError, ExperimentConfig, client_resources, parse_overrides
from core.results import RESULTS_FILE, ResultsError, RunRecord, archive_previous_run, load_results

SUMMARY_FILE = "summary.csv"
# Jobs that differ only by `seed=`, as one row each: mean and sd over seeds (summarize_by_config).
SUMMARY_BY_CONFIG_FILE = "summary_by_config.csv"
STATUS_FILE = "status.json"  # the launcher's verdict on one job: status, reason, Flower's status
FLWR_LOG = "flwr.log"
STARTED_RUN = re.compile(r"Successfully started run (\d+)")
FLOWER_COMPLETED = "finished:completed"
# Names of failed jobs of this process (a Hydra sweep runs its jobs in this process).
FAILED_JOBS: list[str] = []
# Lines of the run's log echoed to the terminal (the whole log goes to the job's flwr.log).
# `flwr run --stream` shows some lines twice, once with a timestamp prefix: echo one of them.
TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")
PROGRESS = re.compile(
    r"round \d+/\d+ \||Experiment:|Large simulation:|Finished:|Run failed:|Invalid experiment"
)


def flwr_run_command(
    cfg: ExperimentConfig, overrides: list[str], token: str = "", sweep_dir: str = "",
    app_dir: Path = PROJECT_DIR,
) -> list[str]:  # fmt: skip
    """The `flwr run` command line for one job (overrides travel as one TOML string; the
    run token, which results.json must echo, as a second; a sweep's directory, which tags the
    job's MLflow run, as a third). `app_dir`: what `flwr run` packs (run_job passes the
    project staged by app/fab.py, the same FAB without walking the virtualenv)."""
    cpus, gpus = client_resources(cfg)
    federation = (
        f"num-supernodes={cfg.simulation.num_supernodes} "
        f"client-resources-num-cpus={cpus} client-resources-num-gpus={gpus:g}"
    )
    # One TOML basic string; core.config.parse_overrides splits it back, keeping Hydra's quotes.
    run_config = f"overrides={json.dumps(' '.join(overrides))}"
    return [
        "flwr", "run", str(app_dir), "--stream",
        "--federation-config", federation,
        "--run-config", run_config,
        "--run-config", f"run-token={json.dumps(token)}",
        "--run-config", f"sweep-dir={json.dumps(sweep_dir)}",
    ]  # fmt: skip


def hydra_quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold spaces, '=' or brackets)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flower_run_status(run_id: int, env: dict, wait_s: float = 30.0) -> dict | None:
    """Flower's record of a run ({"status": "finished:failed", "status-details": ...}) from
    the Control API, through `flwr ls`, once it is finished; None if it cannot be read."""
    deadline = time.monotonic() + wait_s
    while True:
        proc = subprocess.run(
            ["flwr", "ls", "--run-id", str(run_id), "--format", "json"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        try:
            runs = json.loads(proc.stdout).get("runs") or []
        except ValueError:
            runs = []
        run = runs[0] if runs else None
        if run is not None and str(run.get("status", "")).startswith("finished"):
            return run
        if time.monotonic() > deadline:
            return run
        time.sleep(1.0)


def job_outcome(
    job_dir: Path, token: str, returncode: int, flower: dict | None, timed_out_s: float | None = None
) -> dict:
    """ok only when Flower says completed and results.json is this run's and complete;
    otherwise failed with the most precise reason at hand. `timed_out_s`: the launcher ended
    the job after that many seconds (simulation.job_timeout_s), whatever it wrote."""
    results: RunRecord | None = None
    invalid = ""
    results_path = job_dir / RESULTS_FILE
    if results_path.exists():
        try:
            results = load_results(results_path)
        except ResultsError as err:  # JSON, but not the results contract
            invalid = str(err)
        except ValueError:
            results = None
    run = results.run if results is not None else None
    ours = run is not None and bool(token) and run.token == token
    flower_status = flower.get("status") if flower else None
    reason = ""
    if timed_out_s is not None:
        reason = f"timed out after {timed_out_s:g} s (simulation.job_timeout_s)"
    elif ours and run.status == "failed":
        reason = run.error or ""
    elif flower_status is not None and flower_status != FLOWER_COMPLETED:
        reason = f"Flower reports the run {flower_status}: {flower.get('status-details', '')}"
    elif returncode != 0:
        reason = f"flwr run exited {returncode}"
    elif invalid:
        reason = f"results.json does not follow the results contract: {invalid}"
    elif results is None:
        reason = "the run wrote no results.json"
    elif not ours:
        reason = "results.json belongs to another run (its run token differs)"
    elif run.status != "completed" or results.final is None:
        reason = f"the run did not complete (results.json status: {run.status})"
    elif flower is None:
        reason = ""  # Flower's record unreadable: results.json is this run's and complete
    if not reason and flower_status is None and flower is not None:
        reason = "Flower reports no status for the run"
    outcome = {
        "status": "failed" if reason else "ok",
        "reason": " ".join(reason.split())[:500],
        "token": token,
        "flwr_run_id": flower.get("run-id") if flower else (run.flwr_run_id if run else None),
        "flwr_status": flower_status,
        "returncode": returncode,
        "log": str(job_dir / FLWR_LOG),
    }
    (job_dir / STATUS_FILE).write_text(json.dumps(outcome, indent=2))
    if outcome["status"] == "ok":
        outcome.update(results.to_dict())
    return outcome


def stream_process(command, env, on_line, timeout_s=None, on_timeout=None) -> tuple[int, bool]:
    """Run `command`, handing each output line to `on_line`; after `timeout_s` seconds call
    `on_timeout()` (e.g. `flwr stop`), then end the process and its children (its own
    process group: SIGTERM, SIGKILL 10 s later). Returns (exit status, whether it timed out)."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        try:
            if on_timeout is not None:
                on_timeout()
        finally:
            _end_group(proc)

    timer = threading.Timer(timeout_s, expire) if timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line)
        returncode = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
    return returncode, expired.is_set()


def _end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(cfg: ExperimentConfig, overrides: list[str], job_dir: Path, sweep_dir: str = "") -> dict:
    """Run one simulation; return {"status": "ok", **results.json} or a failure record
    {"status": "failed", "reason": ..., "log": ...}. Past simulation.job_timeout_s the run
    is stopped on the SuperLink (`flwr stop`), `flwr run` is ended, and the job fails with
    "timed out after N s". `sweep_dir`: the sweep this job belongs to (its MLflow tag)."""
    env = dict(os.environ)
    # The app is installed in this environment: Flower must not build a per-run one.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    token = uuid.uuid4().hex
    archive_previous_run(job_dir)  # an earlier run's results are never reported as ours
    (job_dir / STATUS_FILE).unlink(missing_ok=True)
    started_run: list[int] = []
    timeout_s = cfg.simulation.job_timeout_s
    with open(job_dir / FLWR_LOG, "w") as log_file, stage_app() as app_dir:
        command = flwr_run_command(cfg, overrides, token, sweep_dir, app_dir)

        def on_line(line: str) -> None:
            log_file.write(line)
            started = STARTED_RUN.search(line)
            if started and not started_run:
                started_run.append(int(started.group(1)))
            if PROGRESS.search(line) and not TIMESTAMPED.match(line):
                sys.stdout.write(line)

        def stop_run() -> None:  # the SuperLink keeps a run going after its `flwr run` ends
            if started_run:
                subprocess.run(["flwr", "stop", str(started_run[0])], env=env, check=False,
                               capture_output=True, text=True, timeout=60)  # fmt: skip

        returncode, timed_out = stream_process(command, env, on_line, timeout_s, stop_run)
    run_id = started_run[0] if started_run else None
    if timed_out:
        return job_outcome(job_dir, token, returncode, None, timed_out_s=timeout_s)
    flower = flower_run_status(run_id, env) if run_id is not None else None
    return job_outcome(job_dir, token, returncode, flower)


def run_experiment(overrides: str | list[str], output_dir: str | Path) -> dict:
    """Run one experiment from Python (notebooks, scripts): validate the overrides, run a
    `flwr run` simulation with `simulation.*` as its federation, write into `output_dir`,
    and return its results.json. Progress lines are printed; the whole log is
    `<output_dir>/flwr.log`. Raises ConfigError before anything starts on a bad override,
    RuntimeError with the reason and the log if the run fails (Flower's status is not
    `finished:completed`, results.json is not this run's complete record, or it ran past
    `simulation.job_timeout_s`)."""
    output_dir = Path(output_dir).resolve()
    tokens = [o for o in parse_overrides(overrides) if not o.startswith("output_dir=")]
    tokens.append(f"output_dir={hydra_quote(str(output_dir))}")
    cfg = load_config(tokens)
    output_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_job(cfg, tokens, output_dir)
    if outcome["status"] != "ok":
        raise RuntimeError(f"run failed: {outcome['reason']} (log: {outcome['log']})")
    return {k: v for k, v in outcome.items() if k in ("run", "rounds", "final", "initial")}


def write_summary(sweep_dir: Path) -> Path:
    """One summary.csv row per job under `sweep_dir`: its status and, for a failed job, the
    reason; for a finished one, its final metrics. When jobs repeat a configuration with
    other seeds, also summary_by_config.csv (:func:`summarize_by_config`)."""
    jobs = _job_rows(sweep_dir)
    rows = [row for row, _ in jobs]
    path = sweep_dir / SUMMARY_FILE
    _write_csv(path, rows)
    by_config = summarize_by_config(jobs)
    grouped = sweep_dir / SUMMARY_BY_CONFIG_FILE
    if by_config:
        _write_csv(grouped, by_config)
    else:  # no configuration has two jobs (yet): no table of one-job means
        grouped.unlink(missing_ok=True)
    return path


def _job_rows(sweep_dir: Path) -> list[tuple[dict, list[str]]]:
    """(summary.csv row, the job's Hydra overrides as a list) of every job, in job order."""
    jobs = []
    for status_path in sorted(sweep_dir.glob(f"*/{STATUS_FILE}"), key=_job_number):
        job_dir = status_path.parent
        outcome = json.loads(status_path.read_text())
        ok = outcome["status"] == "ok"
        results = load_results(job_dir / RESULTS_FILE) if ok else None
        final = results.final if results is not None else None
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        row = {
            "job": job_dir.name,
            "overrides": " ".join(overrides),
            "status": outcome["status"],
            "reason": outcome.get("reason", ""),
            "rounds_completed": (
                final.rounds_completed if final is not None
                else len(results.rounds) if results is not None else 0
            ),
            "stop_reason": _or_blank(final and final.stop_reason),
        }
        for scope in ("centralized", "federated"):
            for metric, value in (getattr(final, scope, None) or {}).items():
                row[f"{scope}_{metric}"] = value
        if final is not None and final.privacy is not None:
            row["privacy_epsilon"] = final.privacy.epsilon
            row["privacy_delta"] = final.privacy.delta
        row["seconds_total"] = _or_blank(final and final.seconds_total)
        comm = final.comm_total if final is not None else None
        row["bytes_down_total"] = comm.bytes_down if comm is not None else ""
        row["bytes_up_total"] = comm.bytes_up if comm is not None else ""
        jobs.append((row, overrides))
    return jobs


def split_seed(overrides: list[str]) -> tuple[list[str], str]:
    """(the overrides without the top-level `seed=` one, that seed's value or "" when the job
    ran with the default seed). `+seed=`/`++seed=` count as `seed=`; `dataset.seed=` and
    other nested keys are part of the configuration."""
    rest, seed = [], ""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "seed":
            seed = value
        else:
            rest.append(override)
    return rest, seed


def summarize_by_config(jobs: list[tuple[dict, list[str]]]) -> list[dict]:
    """summary_by_config.csv: one row per configuration (the jobs' overrides with `seed=`
    removed), in the order of its first job, or no rows when no configuration has two jobs.

    Columns: `config` (those overrides), `jobs` and `seeds` (space separated, in job order;
    "default" for a job without a `seed=` override), `n_ok`, `n_failed`, then for every
    numeric column of summary.csv (final metrics, epsilon and delta, rounds, time, bytes)
    `<column>_mean` and `<column>_sd`: the mean and the sample standard deviation (n - 1;
    `statistics.fmean` and `statistics.stdev`) over the configuration's ok jobs that recorded
    it. A failed job is counted in `n_failed` and never averaged in. `_sd` is blank under two
    values, `nan` when a value is infinite (epsilon = inf at noise multiplier 0); `_mean` is
    blank when no ok job recorded the column."""
    groups: dict[str, list[tuple[dict, str]]] = {}
    for row, overrides in jobs:
        config, seed = split_seed(overrides)
        groups.setdefault(" ".join(config), []).append((row, seed or "default"))
    if all(len(members) < 2 for members in groups.values()):
        return []
    metrics: list[str] = []
    for row, _ in jobs:
        metrics += [k for k, v in row.items() if k not in metrics and _is_number(v)]
    out = []
    for config, members in groups.items():
        ok = [row for row, _ in members if row["status"] == "ok"]
        summary = {
            "config": config,
            "jobs": " ".join(row["job"] for row, _ in members),
            "seeds": " ".join(seed for _, seed in members),
            "n_ok": len(ok),
            "n_failed": len(members) - len(ok),
        }
        for metric in metrics:
            values = [row[metric] for row in ok if _is_number(row.get(metric))]
            summary[f"{metric}_mean"] = statistics.fmean(values) if values else ""
            if len(values) < 2:
                summary[f"{metric}_sd"] = ""
            elif all(math.isfinite(v) for v in values):
                summary[f"{metric}_sd"] = statistics.stdev(values)
            else:  # statistics.stdev cannot take inf; the spread of infinities is undefined
                summary[f"{metric}_sd"] = math.nan
        out.append(summary)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _or_blank(value):
    """A summary cell: the value, or "" where the run did not record it."""
    return "" if value is None else value


def _job_number(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(raw: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("output_dir=")]
    overrides.append(f"output_dir={hydra_quote(str(job_dir))}")
    try:
        cfg = to_experiment_config(raw)
    except ConfigError as err:
        outcome = {"status": "failed", "reason": str(err).splitlines()[0], "log": ""}
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / STATUS_FILE).write_text(json.dumps(outcome, indent=2))
        print(str(err), flush=True)
    else:
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else ""
        outcome = run_job(cfg, overrides, job_dir, sweep_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        summary = write_summary(Path(hydra_cfg.sweep.dir))
        print(f"Sweep summary: {summary}", flush=True)
    if outcome["status"] != "ok":
        FAILED_JOBS.append(job_dir.name)
        print(f"Job {job_dir.name} failed: {outcome['reason']} (log: {outcome['log']})", flush=True)
        return None
    return outcome["final"].get("centralized", {}).get("accuracy")


if __name__ == "__main__":
    main()
    if FAILED_JOBS:
        sys.exit(f"{len(FAILED_JOBS)} job(s) failed: {', '.join(FAILED_JOBS)}")
