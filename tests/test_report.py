"""The HTML report of a run or a sweep: tables and embedded figures from the results contract,
a clear error for a directory with neither, and (in headless Chromium) figures that render."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest

from app.report import ReportError, build_report, write_report


def run_dir(path, privacy=True, rounds=4):
    """A run's output directory as the ServerApp writes it (the results contract of the README)."""
    path.mkdir(parents=True)
    records = []
    for r in range(1, rounds + 1):
        record = {
            "round": r,
            "centralized": {"loss": 2.0 / r, "accuracy": 0.5 + 0.1 * r},
            "federated": {"loss": 2.1 / r, "accuracy": 0.45 + 0.1 * r},
            "clients": {"trained": 5, "failed": 0},
            "comm": {"bytes_down": 200_000, "bytes_up": 100_000},
            "seconds": 0.5,
        }
        if privacy:
            record["privacy"] = {"epsilon": 0.7 * r, "delta": 1e-5}
        records.append(record)
    final = {"rounds_completed": rounds, "stop_reason": f"completed {rounds} rounds",
             "centralized": records[-1]["centralized"], "seconds_total": 2.0}  # fmt: skip
    if privacy:
        final["privacy"] = records[-1]["privacy"]
    (path / "results.json").write_text(json.dumps({"rounds": records, "final": final}))
    (path / "config.yaml").write_text("num_rounds: 4\nseed: 0\n")
    return path


def sweep_dir(path):
    path.mkdir()
    rows = []
    for job, z in enumerate([0.5, 1.0, 2.0]):
        run_dir(path / str(job))
        rows.append({"job": str(job), "overrides": f"privacy.noise_multiplier={z}", "status": "ok",
                     "centralized_accuracy": 0.9 - 0.1 * job, "centralized_loss": 0.3 + job,
                     "privacy_epsilon": 8.0 / (job + 1)})  # fmt: skip
    with open(path / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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
    without_dp = build_report(run_dir(tmp_path / "plain", privacy=False))
    assert "Privacy spent" not in without_dp and len(figures(without_dp)) == 2


def test_sweep_report_has_the_jobs_table_and_accuracy_against_epsilon(tmp_path):
    page = build_report(sweep_dir(tmp_path / "sweep"))
    assert figures(page) == [
        "Final centralized_accuracy per job", "centralized_accuracy against epsilon",
        "Loss per round, every job",
    ]  # fmt: skip
    assert "privacy.noise_multiplier=2.0" in page


def test_a_directory_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="results.json.*summary.csv"):
        build_report(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "app.report", str(tmp_path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "neither" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
