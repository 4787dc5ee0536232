"""End to end: `flwr run .` on Flower's simulation engine, as a user runs it.

One isolated Flower home for the module (its own FLWR_HOME and ports); the fixture stops the
SuperLink, SuperExec, simulation and Ray processes it started, by PID.
"""

import csv
import json
import re
import subprocess
import sys

import pytest
import torch

from app.sweep import TIMESTAMPED

pytestmark = pytest.mark.e2e


def test_default_experiment_on_digits_learns_and_writes_every_result(flower, tmp_path):
    out = tmp_path / "digits"
    proc = flower.run(f"num_rounds=5 output_dir={out}", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Results in {out}" in proc.stdout

    for name in ("config.yaml", "results.json", "metrics.png", "model.pt"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    for r in rounds:
        # digits: 10 classes, each with its recall
        assert set(r["centralized"]) == {"loss", "accuracy", "f1", "ece", *(f"recall_{k}" for k in range(10))}
        assert r["comm"]["bytes_down"] > r["comm"]["bytes_up"] > 0
        assert r["seconds"] > 0
        assert r["clients"] == {"trained": 2, "failed": 0}  # fraction_train=0.5 of 4
    final = results["final"]
    assert final["centralized"]["accuracy"] >= 0.85
    assert final["num_parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    assert final["rounds_completed"] == 5 and final["num_supernodes"] == 4
    assert "num_rounds: 5" in (out / "config.yaml").read_text()
    # one readable line per round in the log (`--stream` may repeat a line with a timestamp)
    round_lines = [
        line for line in proc.stdout.splitlines()
        if "| clients 2 ok 0 failed |" in line and not TIMESTAMPED.match(line)
    ]  # fmt: skip
    assert [re.search(r"round (\d+)/5 \|", line).group(1) for line in round_lines] == list("12345")
    # the app was already installed: Flower must not have built a per-run environment
    assert not (flower.home / "runtime-envs").exists()
    # the report of a real run: every figure present
    report = subprocess.run([sys.executable, "-m", "app.report", str(out)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') == 2


def test_bad_override_fails_before_any_training(flower, tmp_path):
    out = tmp_path / "bad"
    proc = flower.run(f"model=transformer output_dir={out}", 2)
    text = proc.stdout + proc.stderr
    assert "Invalid experiment configuration" in text
    assert "cnn" in text and "mlp" in text  # the valid choices are named
    assert not (out / "results.json").exists()


def test_sweep_cli_runs_each_job_as_a_simulation_with_a_summary(flower, tmp_path):
    tmp_path = tmp_path / "sweep dir with spaces"  # job paths travel through two parsers
    tmp_path.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "app.sweep", "-m", "seed=0,1", "num_rounds=1",
         "simulation.num_supernodes=2", "strategy.fraction_evaluate=0", "tracking.enabled=true"],
        cwd=tmp_path, env=flower.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (summary,) = tmp_path.glob("multirun/*/*/summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert all(r["status"] == "ok" and r["rounds_completed"] == "1" for r in rows)
    assert rows[0]["overrides"].startswith("seed=0") and rows[1]["overrides"].startswith("seed=1")
    for job in ("0", "1"):
        assert (summary.parent / job / "results.json").exists()
        assert (summary.parent / job / "flwr.log").exists()
    # different seeds, different runs
    assert rows[0]["centralized_loss"] != rows[1]["centralized_loss"]
    # one configuration over two seeds: its mean and sample standard deviation
    (grouped,) = list(csv.DictReader((summary.parent / "summary_by_config.csv").open()))
    assert grouped["seeds"] == "0 1" and grouped["n_ok"] == "2" and grouped["n_failed"] == "0"
    losses = [float(r["centralized_loss"]) for r in rows]
    assert float(grouped["centralized_loss_mean"]) == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert float(grouped["centralized_loss_sd"]) == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5, rel=1e-9)

    # each job is an MLflow run, tagged with the sweep (the ServerApp of each job logged it;
    # tests/test_tracking.py checks every number in process)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=flower.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("flower-private-finetune")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.sweep = '{summary.parent}'")  # fmt: skip
    by_job = {r.data.tags["sweep.job"]: r for r in runs}
    assert sorted(by_job) == ["0", "1"]
    for row in rows:
        run = by_job[row["job"]]
        results = json.loads((summary.parent / row["job"] / "results.json").read_text())
        assert run.info.status == "FINISHED" and results["run"]["tracking"]["run_id"] == run.info.run_id
        assert run.data.params["seed"] == row["job"] and run.data.params["num_rounds"] == "1"
        assert run.data.metrics["centralized.loss"] == float(row["centralized_loss"])
        assert run.data.metrics["comm.bytes_up"] == results["rounds"][0]["comm"]["bytes_up"]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"results.json", "model.pt"}


@pytest.mark.parametrize(
    "privacy",
    [
        "privacy=local privacy.noise_multiplier=2.0",
        "privacy=dpsgd privacy.noise_multiplier=1.0",
    ],
)
def test_every_privacy_option_completes_with_epsilon_per_round(flower, tmp_path, privacy):
    out = tmp_path / "dp"
    proc = flower.run(f"{privacy} num_rounds=3 output_dir={out}", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["rounds_completed"] == 3
    epsilons = [r["privacy"]["epsilon"] for r in results["rounds"]]
    assert all(r["privacy"]["delta"] == 1e-5 for r in results["rounds"])
    assert 0 < epsilons[0] and epsilons == sorted(epsilons)  # never decreases
    assert results["final"]["privacy"]["epsilon"] == epsilons[-1]
    assert "epsilon" in proc.stdout  # the round log line shows it


def _centralized_accuracy(model_file):
    from app.config import load_config
    from core.data import centralized_test_split, data_spec
    from core.evaluation import evaluate
    from core.models import build_model

    cfg = load_config("")
    model = build_model(cfg.model, data_spec(cfg.dataset))
    model.load_state_dict(torch.load(model_file))
    test = centralized_test_split(cfg.dataset, cfg.seed)
    return evaluate(model, test, "classification", torch.device("cpu"))["accuracy"]


def test_he_secure_aggregation_matches_plaintext_fedavg(flower, tmp_path):
    """Every client trains every round (fraction_train=1), so the plaintext and the HE run see
    the same training; the HE model, decrypted by the key holders' CLI, scores the same."""
    common = "num_rounds=4 strategy.fraction_train=1.0 strategy.fraction_evaluate=1.0"
    plain, he = tmp_path / "plain", tmp_path / "he"
    proc = flower.run(f"{common} output_dir={plain}", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = flower.run(f"secagg=he {common} output_dir={he}", num_supernodes=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((he / "results.json").read_text())
    assert results["final"]["rounds_completed"] == 4
    assert "centralized" in results["initial"]  # the initial model is plaintext
    for r in results["rounds"]:
        assert "centralized" not in r  # the server cannot read the model
        assert r["clients"] == {"trained": 4, "failed": 0}
        assert r["secagg"]["clients_aggregated"] == 4
        assert r["comm"]["bytes_up"] > 4 * 4810 * 4  # ciphertexts, not float32
    assert results["final"]["model_file"] == "model_encrypted.npz"
    assert not (he / "model.pt").exists()
    assert (he / "keys" / "public.ctx").exists() and (he / "keys" / "secret.ctx").exists()

    proc = subprocess.run(
        [sys.executable, "-m", "app.he_keys", "decrypt-model", str(he)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    he_accuracy = _centralized_accuracy(he / "model.pt")
    plain_accuracy = json.loads((plain / "results.json").read_text())["final"]["centralized"]["accuracy"]
    assert plain_accuracy >= 0.85
    assert abs(he_accuracy - plain_accuracy) <= 0.01
    assert abs(results["final"]["federated"]["accuracy"] - he_accuracy) < 0.1
