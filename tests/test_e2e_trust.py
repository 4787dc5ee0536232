"""End to end (issue 17): failed runs are reported as failed by every entry point, a rerun
never reports an earlier run's results, and the log has each line once."""

import csv
import json
import re
import subprocess
import sys

import pytest

from core.results import MODEL_FILE, PREVIOUS_DIR, RESULTS_FILE
from app.sweep import STARTED_RUN, TIMESTAMPED, run_experiment

pytestmark = pytest.mark.e2e

SMALL = "num_rounds=1 simulation.num_supernodes=2"
FLOWER_KEYS = ("FLWR_HOME", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_DISABLE_UPDATE_CHECK")  # fmt: skip


def test_a_failed_rerun_fails_and_never_reports_the_previous_results(flower, tmp_path, monkeypatch):
    for key in FLOWER_KEYS:
        monkeypatch.setenv(key, flower.env[key])
    out = tmp_path / "run"
    # no validation data, federated evaluation asked for: once a KeyError 'loss' per client
    first = run_experiment(f"{SMALL} dataset.val_fraction=0 strategy.fraction_evaluate=1.0", out)
    assert first["run"]["status"] == "completed" and first["final"]["rounds_completed"] == 1
    assert "failures" not in first["rounds"][0]["clients"]
    log = (out / "flwr.log").read_text()
    assert not [line for line in log.splitlines() if TIMESTAMPED.match(line)]  # no duplicates
    assert "History (loss" not in log and "History (metrics" not in log
    # every client's update is non-finite and rejected: the run must fail, writing no model
    with pytest.raises(RuntimeError) as info:
        run_experiment(f"{SMALL} training.lr=1e30 training.local_epochs=1", out)
    assert "no client update was aggregated in any of 1 rounds" in str(info.value)
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["run"]["status"] == "failed" and results["run"]["token"] != first["run"]["token"]
    assert results["rounds"][0]["clients"]["trained"] == 0
    assert results["rounds"][0]["clients"]["failed"] == 2  # min_train_clients=2 of 2
    assert not (out / MODEL_FILE).exists()
    previous = out / PREVIOUS_DIR / first["run"]["token"]
    assert json.loads((previous / RESULTS_FILE).read_text())["final"] == first["final"]
    assert (previous / MODEL_FILE).exists()


def test_too_few_supernodes_fails_the_run_in_flower_before_training(flower, tmp_path):
    out = tmp_path / "few"
    # simulation.num_supernodes (10) allows 3; the federation `flwr run` starts has 2
    proc = flower.run(f"strategy.min_train_clients=3 output_dir={out}", num_supernodes=2)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0  # Flower's own exit code says nothing about the run
    run_id = STARTED_RUN.search(text).group(1)
    ls = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"],
                        env=flower.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    (run,) = json.loads(ls.stdout)["runs"]
    assert run["status"] == "finished:failed"
    assert "but the federation has 2 SuperNodes" in run["status-details"]
    assert text.count("Traceback (most recent call last)") == 1
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["run"]["status"] == "failed" and results["rounds"] == []
    assert not (out / MODEL_FILE).exists()


def test_sweep_exits_non_zero_and_summarizes_a_failed_job(flower, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "app.sweep", "-m", "training.lr=1e30", *SMALL.split(),
         "strategy.fraction_evaluate=0"],
        cwd=tmp_path, env=flower.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 job(s) failed: 0" in proc.stderr
    assert re.search(r"Job 0 failed: RunFailed: no client update was aggregated", proc.stdout)
    (summary,) = tmp_path.glob("multirun/*/*/summary.csv")
    (row,) = list(csv.DictReader(summary.open()))
    assert row["status"] == "failed"
    assert row["reason"].startswith("RunFailed: no client update was aggregated in any of 1 rounds")


def _kill_serverapp_after_checkpoint(flower, proc, out, after_round: int, timeout: float = 300) -> int:
    """SIGKILL the ServerApp (the `flwr-simulation` process) as soon as the checkpoint of
    `after_round` is on disk: a crash mid-run, not a clean stop. Returns the checkpoint's round."""
    import os
    import signal
    import time

    from app.checkpoint import CHECKPOINT_DIR, STATE_FILE

    state = out / CHECKPOINT_DIR / STATE_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            reached = json.loads(state.read_text())["round"]
        except (OSError, ValueError, KeyError):
            reached = 0
        if reached >= after_round:
            for pid in flower.pids_running("flwr-simulation"):
                os.kill(pid, signal.SIGKILL)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # flwr run --stream may keep waiting: end it
                proc.kill()
                proc.wait()
            return json.loads(state.read_text())["round"]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of round {after_round} before the run ended: "
                         + (proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"))


def test_same_seed_gives_the_same_model_bit_for_bit_even_across_a_kill_and_resume(flower, tmp_path):
    """Run a: 5 rounds. Run b, same config: its ServerApp is SIGKILLed once round 2's checkpoint
    is written, then `resume=true` finishes it. Without DP noise both end with the same model,
    bit for bit, and the same per-round records: sampling, training and the resumed strategy
    state are all reproducible from the seed and the checkpoint."""
    import torch
    from omegaconf import OmegaConf

    from core.results import CONFIG_FILE

    def records(out):
        results = json.loads((out / RESULTS_FILE).read_text())
        assert results["run"]["status"] == "completed", results["run"]
        rounds = [{k: r.get(k) for k in ("centralized", "federated", "train", "clients")} for r in results["rounds"]]
        for r in rounds:  # wall time is the one measurement that may differ
            assert r["train"].pop("train_seconds") > 0
        return results, rounds

    config = "num_rounds=5 seed=5"
    a, b = tmp_path / "a", tmp_path / "b"
    # a plain `flwr run` of 3 SuperNodes, while simulation.num_supernodes says 10
    proc = flower.run(f"{config} output_dir={a}", num_supernodes=3)
    text = proc.stdout + proc.stderr
    assert "Experiment: simulation of 3 SuperNodes, 5 rounds, strategy=fedavg privacy=none" in text, text[-3000:]
    assert "cohorts seeded (seed=5)" in text
    assert "3 SuperNodes connected but simulation.num_supernodes=10" in text
    assert "did not answer its partition id" not in text
    # partition ids from the registration order (no message a node), the first cohort's answers agree
    assert "seeded sampling: partition ids of 3 nodes from their registration order" in text
    assert "answered the partition ids of the registration order" in text
    assert "asking every node instead" not in text
    assert OmegaConf.load(a / CONFIG_FILE).simulation.num_supernodes == 3
    results_a, rounds_a = records(a)

    killed_at = _kill_serverapp_after_checkpoint(flower, flower.start(f"{config} output_dir={b}", num_supernodes=3), b, 2)
    assert 2 <= killed_at < 5, killed_at
    assert not (b / MODEL_FILE).exists()  # the crashed run wrote no final model
    flower.stop()  # what the crash left behind (its SuperLink, Ray): as after a machine restart

    proc = flower.run(f"{config} output_dir={b} resume=true", num_supernodes=3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results_b, rounds_b = records(b)
    assert results_b["run"]["resumed_after_round"] == killed_at
    assert len(rounds_a) == 5 and rounds_a == rounds_b
    model_a, model_b = torch.load(a / MODEL_FILE), torch.load(b / MODEL_FILE)
    assert model_a.keys() == model_b.keys() and len(model_a) > 0
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


def test_a_job_past_its_timeout_is_stopped_on_the_superlink_and_fails(flower, tmp_path, monkeypatch):
    for key in FLOWER_KEYS:
        monkeypatch.setenv(key, flower.env[key])
    out = tmp_path / "slow"
    # 200 rounds take minutes here; the job is ended after 25 s
    with pytest.raises(RuntimeError) as info:
        run_experiment(f"{SMALL} num_rounds=200 simulation.job_timeout_s=25", out)
    assert "run failed: timed out after 25 s (simulation.job_timeout_s)" in str(info.value)
    status = json.loads((out / "status.json").read_text())
    # the reason, not flwr run's exit code: after `flwr stop` ends the run, `flwr run` may exit
    # 0 before its process group is killed (Flower exits 0 for a stopped run)
    assert status["status"] == "failed"
    assert status["reason"] == "timed out after 25 s (simulation.job_timeout_s)", status
    run_id = STARTED_RUN.search((out / "flwr.log").read_text()).group(1)
    ls = subprocess.run(["flwr", "ls", "--run-id", run_id, "--format", "json"], check=True,
                        env=flower.env, capture_output=True, text=True, timeout=60)  # fmt: skip
    (run,) = json.loads(ls.stdout)["runs"]
    assert run["status"].startswith("finished:") and run["status"] != "finished:completed", run
    assert not (out / MODEL_FILE).exists()
