"""The HTML report of a run or a sweep: tables and embedded figures from the results contract,
a clear error for a directory with neither, and (in headless Chromium) figures that render.
The directories are written by the real recorder: the round loop over in-process clients and
the ServerApp's end of run, and for a sweep the launcher's job_outcome and write_summary."""

import csv
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters
from omegaconf import OmegaConf

from app.client_app import build_client
from app.experiment_server import ExperimentServer, NodeTrackingClientManager
from app.report import ReportError, build_report, write_report
from app.server_app import finish_run
from app.sweep import job_outcome, write_summary
from app.config import load_config
from core.data import centralized_test_split, data_spec
from core.evaluation import evaluate
from core.finetune import build_finetune_model
from core.models import get_weights, set_weights
from core.results import RunRecorder, load_results
from strategies.factory import build_strategy
from tests.support.rounds import in_process_run



def recorded_run(path, overrides: str, num_nodes: int = 2):
    """A run's output directory as the ServerApp writes it: its round loop over real
    in-process clients, recorded by the real RunRecorder, and its end of run
    (tests/support/rounds.py)."""
    in_process_run(f"{overrides} strategy.fraction_train=1.0 strategy.fraction_evaluate=1.0", path,
                   num_nodes=num_nodes, centralized_test=True).fit().finish()  # fmt: skip
    return path


def run_dir(path, privacy=True, rounds=4):
    dp = "privacy=server_fixed privacy.noise_multiplier=0.3" if privacy else ""
    return recorded_run(path, f"model=linear num_rounds={rounds} {dp}")


def sweep_dir(path):
    """A sweep directory as app.sweep leaves it: a job directory per run (with Hydra's
    overrides.yaml and the launcher's status.json) and summary.csv from write_summary."""
    path.mkdir()
    for job, z in enumerate([0.5, 1.0, 2.0]):
        overrides = [f"privacy.noise_multiplier={z}"]
        recorded_run(path / str(job), f"model=linear num_rounds=2 privacy=server_fixed {overrides[0]}")
        (path / str(job) / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(overrides), path / str(job) / ".hydra" / "overrides.yaml")
        outcome = job_outcome(path / str(job), "t", 0, {"run-id": str(job), "status": "finished:completed"})
        assert outcome["status"] == "ok", outcome
    write_summary(path)
    return path


def figures(page):
    return re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)


def test_run_report_has_outcome_rounds_and_figures(tmp_path):
    page = build_report(run_dir(tmp_path / "run"))
    assert figures(page) == [
        "Accuracy and loss per round", "Privacy spent: epsilon after each round", "Traffic per round",
    ]  # fmt: skip
    assert "<td>4</td>" in page and "completed 4 rounds" in page  # outcome table
    assert page.count("<tr><td>") >= 4  # a row per round
    assert "num_rounds: 4" in page  # the resolved configuration
    results = load_results(tmp_path / "run")
    assert [r.round for r in results.rounds] == [1, 2, 3, 4]
    assert all(f"<tr><td>{r}</td>" in page for r in (1, 2, 3, 4))  # the rounds table
    epsilons = [r.privacy.epsilon for r in results.rounds]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # spent, round after round
    assert f"<td>{epsilons[-1]:.4g}</td>" in page  # the last round's and the final epsilon
    assert f"<td>{results.final.centralized['accuracy']:.4g}</td>" in page
    assert f"<td>{results.final.comm_total.bytes_down}</td>" in page
    without_dp = build_report(run_dir(tmp_path / "plain", privacy=False))
    assert "Privacy spent" not in without_dp and len(figures(without_dp)) == 2


def test_sweep_report_has_the_jobs_table_and_accuracy_against_epsilon(tmp_path):
    page = build_report(sweep_dir(tmp_path / "sweep"))
    assert figures(page) == [
        "Final centralized_accuracy per job", "centralized_accuracy against epsilon",
        "Loss per round, every job",
    ]  # fmt: skip
    assert "privacy.noise_multiplier=2.0" in page
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    for row in rows:  # each job's row is its recorded final
        final = load_results(tmp_path / "sweep" / row["job"]).final
        assert float(row["privacy_epsilon"]) == final.privacy.epsilon
        assert f"<td>{final.privacy.epsilon:.4g}</td>" in page
    # more noise, less epsilon for the same rounds and cohort
    assert [float(r["privacy_epsilon"]) for r in rows] == sorted(
        (float(r["privacy_epsilon"]) for r in rows), reverse=True
    )


@pytest.mark.integration  # runs `python -m app.report` as a program (its exit code and stderr)
def test_a_directory_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="results.json.*summary.csv"):
        build_report(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "app.report", str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "neither" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.integration  # renders the report in headless Chromium
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_the_report_shows_its_figures_in_headless_chromium(tmp_path, kind):
    directory = run_dir(tmp_path / "run") if kind == "run" else sweep_dir(tmp_path / "sweep")
    report = write_report(directory)
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    body = re.search(r"<body[^>]*>", proc.stdout)
    assert body, proc.stderr[-2000:]
    shown = re.search(r'data-figures-shown="(\d+)"', body.group(0))
    total = re.search(r'data-figures-total="(\d+)"', body.group(0))
    assert shown and total, body.group(0)
    assert int(shown.group(1)) == int(total.group(1)) == 3  # every figure decoded and drawn
