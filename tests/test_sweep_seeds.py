"""Seeds grouped (issue "Runs you can trust"): a sweep's jobs that differ only by `seed=` are one
configuration in summary_by_config.csv, with the mean and sample standard deviation of each
final metric over its ok jobs, and the sweep report shows that table as mean ± sd.

The job directories are what app.sweep leaves: results.json written by the real RunRecorder,
Hydra's .hydra/overrides.yaml, and the launcher's status.json from job_outcome."""

from __future__ import annotations

import csv
import math

import pytest
from omegaconf import OmegaConf

from app.config import load_config
from app.report import build_report
from app.sweep import (
    SUMMARY_BY_CONFIG_FILE,
    SUMMARY_FILE,
    job_outcome,
    split_seed,
    write_summary,
)
from core.results import RunRecorder


def job(sweep, number: int, overrides: list[str], accuracy: float | None = None, error: str = ""):
    """Job `number` of a sweep: a completed run with final centralized `accuracy`, or, with
    `error`, a run that failed (Flower reports it failed)."""
    directory = sweep / str(number)
    token = f"token-{number}"
    recorder = RunRecorder(directory, load_config("model=linear"), token=token)
    (directory / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(overrides), directory / ".hydra" / "overrides.yaml")
    if error:
        recorder.fail(error)
        flower = {"run-id": str(number), "status": "finished:failed"}
    else:
        recorder.add_round({"round": 1, "centralized": {"loss": 1.0 - accuracy, "accuracy": accuracy}})
        recorder.finish(
            {
                "rounds_completed": 1,
                "centralized": {"loss": 1.0 - accuracy, "accuracy": accuracy},
                "seconds_total": 10.0 * (number + 1),
                "comm_total": {"bytes_down": 1000 * (number + 1), "bytes_up": 500},
            },
            model=None,
        )
        flower = {"run-id": str(number), "status": "finished:completed"}
    outcome = job_outcome(directory, token, 0, flower)
    assert outcome["status"] == ("failed" if error else "ok"), outcome


def seed_sweep(sweep):
    """`-m strategy=fedavg,fedprox seed=0,1,2` (Hydra's job order and overrides), one fedprox
    seed failed; plus a configuration run with one seed only."""
    sweep.mkdir()
    accuracies = {"fedavg": [0.8, 0.9, 1.0], "fedprox": [0.5, 0.7, None]}
    number = 0
    for strategy, values in accuracies.items():
        for seed, accuracy in enumerate(values):
            overrides = [f"strategy={strategy}", f"seed={seed}"]
            if accuracy is None:
                job(sweep, number, overrides, error="RunFailed: nothing aggregated")
            else:
                job(sweep, number, overrides, accuracy)
            number += 1
    job(sweep, number, ["strategy=fedadam", "seed=0"], 0.6)
    write_summary(sweep)
    return sweep


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_sweep(tmp_path_factory.mktemp("seeds") / "sweep")


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jobs_that_differ_only_by_seed_are_one_row_with_mean_and_sd_over_the_ok_ones(seeds):
    sweep = seeds
    assert len(rows(sweep / SUMMARY_FILE)) == 7  # the per-job table is unchanged: a row per job
    fedavg, fedprox, fedadam = rows(sweep / SUMMARY_BY_CONFIG_FILE)

    assert (fedavg["config"], fedavg["jobs"], fedavg["seeds"]) == ("strategy=fedavg", "0 1 2", "0 1 2")
    assert (fedavg["n_ok"], fedavg["n_failed"]) == ("3", "0")
    assert float(fedavg["centralized_accuracy_mean"]) == pytest.approx(0.9, abs=1e-15)
    assert float(fedavg["centralized_accuracy_sd"]) == pytest.approx(0.1, abs=1e-15)
    assert float(fedavg["centralized_loss_mean"]) == pytest.approx(0.1, abs=1e-15)
    assert float(fedavg["seconds_total_mean"]) == 20.0  # 10, 20, 30 s
    assert float(fedavg["seconds_total_sd"]) == 10.0
    assert float(fedavg["bytes_down_total_mean"]) == 2000.0  # 1000, 2000, 3000
    assert float(fedavg["bytes_up_total_sd"]) == 0.0
    assert float(fedavg["rounds_completed_mean"]) == 1.0

    # the failed seed is counted as failed and never averaged in: 0.5 and 0.7 only
    assert (fedprox["config"], fedprox["jobs"], fedprox["seeds"]) == ("strategy=fedprox", "3 4 5", "0 1 2")
    assert (fedprox["n_ok"], fedprox["n_failed"]) == ("2", "1")
    assert float(fedprox["centralized_accuracy_mean"]) == pytest.approx(0.6, abs=1e-15)
    assert float(fedprox["centralized_accuracy_sd"]) == pytest.approx(math.sqrt(0.02), abs=1e-15)
    assert float(fedprox["seconds_total_mean"]) == 45.0  # jobs 3 and 4: 40 and 50 s

    # one seed: its value, no standard deviation
    assert (fedadam["config"], fedadam["seeds"], fedadam["n_ok"]) == ("strategy=fedadam", "0", "1")
    assert float(fedadam["centralized_accuracy_mean"]) == 0.6
    assert fedadam["centralized_accuracy_sd"] == ""
    # no column for the per-job text (job, overrides, status, reason, stop_reason)
    assert not [c for c in fedavg if c.startswith(("job_", "status_", "reason_", "stop_reason_"))]


def test_a_configuration_whose_every_seed_failed_has_counts_and_no_means(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    job(sweep, 0, ["seed=0"], error="RunFailed: a")
    job(sweep, 1, ["seed=1"], error="RunFailed: b")
    write_summary(sweep)
    (row,) = rows(sweep / SUMMARY_BY_CONFIG_FILE)
    assert (row["config"], row["seeds"], row["n_ok"], row["n_failed"]) == ("", "0 1", "0", "2")
    assert row["rounds_completed_mean"] == "" and row["rounds_completed_sd"] == ""
    page = build_report(sweep)
    assert "<td class=text>(defaults)</td><td class=text>0 1</td><td>0</td><td>2</td>" in page


def test_without_repeated_configurations_there_is_no_grouped_file(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    job(sweep, 0, ["strategy=fedavg", "seed=0"], 0.8)
    (sweep / SUMMARY_BY_CONFIG_FILE).write_text("stale\n")  # e.g. from an earlier sweep here
    write_summary(sweep)
    assert not (sweep / SUMMARY_BY_CONFIG_FILE).exists()  # one job: nothing to average yet
    assert "mean ± sd" not in build_report(sweep)
    job(sweep, 1, ["strategy=fedavg", "seed=1"], 0.9)  # the sweep's second job
    write_summary(sweep)
    (row,) = rows(sweep / SUMMARY_BY_CONFIG_FILE)
    assert row["seeds"] == "0 1" and float(row["centralized_accuracy_mean"]) == pytest.approx(0.85)


def test_only_the_top_level_seed_override_is_removed():
    assert split_seed(["strategy=fedavg", "seed=2"]) == (["strategy=fedavg"], "2")
    assert split_seed(["+seed=3", "model=cnn"]) == (["model=cnn"], "3")
    assert split_seed(["partitioner.seed=1", "model=cnn"]) == (["partitioner.seed=1", "model=cnn"], "")
    assert split_seed(["seeds=1"]) == (["seeds=1"], "")


def test_the_sweep_report_shows_the_grouped_table_as_mean_and_sd(seeds):
    page = build_report(seeds)
    assert "<h2>Configurations: mean ± sd over seeds</h2>" in page
    assert page.index("Configurations: mean") < page.index("<h2>Jobs</h2>")
    grouped = page[page.index("Configurations: mean") : page.index("<h2>Jobs</h2>")]
    assert "<th>centralized_accuracy</th>" in grouped
    row = (
        "<tr><td class=text>strategy=fedavg</td><td class=text>0 1 2</td><td>3</td><td>0</td>"
    )
    assert row in grouped
    assert "<td class=text>0.9 ± 0.1</td>" in grouped  # accuracy over seeds 0, 1, 2
    assert "<td class=text>0.6 ± 0.1414</td>" in grouped  # fedprox: its two ok seeds
    fedprox = "<tr><td class=text>strategy=fedprox</td><td class=text>0 1 2</td><td>2</td><td>1</td>"
    assert fedprox in grouped
    fedadam = grouped[grouped.index("<tr><td class=text>strategy=fedadam") :].split("</tr>")[0]
    assert "<td class=text>0.6</td>" in fedadam and "±" not in fedadam  # one seed: the mean alone
