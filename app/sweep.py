"""Hydra CLI: each job is a full Flower simulation (`flwr run`) with its own output directory.

    python -m app.sweep model=cnn num_rounds=5                # one run
    python -m app.sweep -m strategy=fedavg,fedprox seed=0,1   # a sweep of four runs

Every job validates its configuration first (a bad override fails before anything starts),
then launches `flwr run <project> --stream` with the job's overrides, the federation size
from `simulation.*`, and `output_dir` set to Hydra's job directory. In a sweep, the sweep
directory gets `summary.csv` with the final metrics of every job, rewritten after each job.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from app.config import (
    CONF_DIR,
    ConfigError,
    ExperimentConfig,
    client_resources,
    load_config,
    parse_overrides,
    to_experiment_config,
)
from app.results import RESULTS_FILE

PROJECT_DIR = CONF_DIR.parent
SUMMARY_FILE = "summary.csv"
FLWR_LOG = "flwr.log"
# Lines of the run's log echoed to the terminal (the whole log goes to the job's flwr.log).
# `flwr run --stream` shows some lines twice, once with a timestamp prefix: echo one of them.
TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")
PROGRESS = re.compile(r"round \d+/\d+ \||Experiment:|Finished:|ERROR|Invalid experiment")


def flwr_run_command(cfg: ExperimentConfig, overrides: list[str]) -> list[str]:
    """The `flwr run` command line for one job (overrides travel as one TOML string)."""
    cpus, gpus = client_resources(cfg)
    federation = (
        f"num-supernodes={cfg.simulation.num_supernodes} "
        f"client-resources-num-cpus={cpus} client-resources-num-gpus={gpus:g}"
    )
    # One TOML basic string; app.config.parse_overrides splits it back, keeping Hydra's quotes.
    run_config = f"overrides={json.dumps(' '.join(overrides))}"
    return [
        "flwr", "run", str(PROJECT_DIR), "--stream",
        "--federation-config", federation,
        "--run-config", run_config,
    ]  # fmt: skip


def hydra_quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold spaces, '=' or brackets)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_job(cfg: ExperimentConfig, overrides: list[str], job_dir: Path) -> dict:
    """Run one simulation; return its results.json (or a failure record)."""
    env = dict(os.environ)
    # The app is installed in this environment: Flower must not build a per-run one.
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    command = flwr_run_command(cfg, overrides)
    with open(job_dir / FLWR_LOG, "w") as log_file:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            if PROGRESS.search(line) and not TIMESTAMPED.match(line):
                sys.stdout.write(line)
        returncode = proc.wait()
    results_path = job_dir / RESULTS_FILE
    if returncode != 0 or not results_path.exists() or not json.loads(results_path.read_text())[
        "final"
    ]:
        return {"status": "failed", "log": str(job_dir / FLWR_LOG), "returncode": returncode}
    return {"status": "ok", **json.loads(results_path.read_text())}


def run_experiment(overrides: str | list[str], output_dir: str | Path) -> dict:
    """Run one experiment from Python (notebooks, scripts): validate the overrides, run a
    `flwr run` simulation with `simulation.*` as its federation, write into `output_dir`,
    and return its results.json. Progress lines are printed; the whole log is
    `<output_dir>/flwr.log`. Raises ConfigError before anything starts on a bad override,
    RuntimeError naming the log if the run fails."""
    output_dir = Path(output_dir).resolve()
    tokens = [o for o in parse_overrides(overrides) if not o.startswith("output_dir=")]
    tokens.append(f"output_dir={hydra_quote(str(output_dir))}")
    cfg = load_config(tokens)
    output_dir.mkdir(parents=True, exist_ok=True)
    outcome = run_job(cfg, tokens, output_dir)
    if outcome["status"] != "ok":
        raise RuntimeError(f"run failed (exit {outcome['returncode']}): see {outcome['log']}")
    return {k: v for k, v in outcome.items() if k != "status"}


def write_summary(sweep_dir: Path) -> Path:
    """Collect the final metrics of every finished job under `sweep_dir` into summary.csv."""
    rows = []
    for results_path in sorted(sweep_dir.glob(f"*/{RESULTS_FILE}"), key=_job_number):
        job_dir = results_path.parent
        results = json.loads(results_path.read_text())
        final = results.get("final", {})
        row = {
            "job": job_dir.name,
            "overrides": " ".join(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")),
            "status": "ok" if final else "failed",
            "rounds_completed": final.get("rounds_completed", len(results.get("rounds", []))),
            "stop_reason": final.get("stop_reason", ""),
        }
        for scope in ("centralized", "federated"):
            for metric, value in final.get(scope, {}).items():
                row[f"{scope}_{metric}"] = value
        if "privacy" in final:
            row["privacy_epsilon"] = final["privacy"]["epsilon"]
            row["privacy_delta"] = final["privacy"]["delta"]
        row["seconds_total"] = final.get("seconds_total", "")
        comm = final.get("comm_total", {})
        row["bytes_down_total"] = comm.get("bytes_down", "")
        row["bytes_up_total"] = comm.get("bytes_up", "")
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = sweep_dir / SUMMARY_FILE
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


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
        sys.exit(str(err))
    outcome = run_job(cfg, overrides, job_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        summary = write_summary(Path(hydra_cfg.sweep.dir))
        print(f"Sweep summary: {summary}", flush=True)
    if outcome["status"] != "ok":
        print(f"Job failed (exit {outcome['returncode']}): see {outcome['log']}", flush=True)
        return None
    return outcome["final"].get("centralized", {}).get("accuracy")


if __name__ == "__main__":
    main()
