"""Runs you can trust (issue 17), without Ray: the round loop with real in-process clients,
the run directory and the launcher's verdict on real files, and the log handlers."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters

from app.client_app import build_client
from app.config import load_config
from core.data import data_spec, load_client_data
from core.evaluation import evaluate
from app.experiment_server import (
    MAX_REASON_CHARS,
    ExperimentServer,
    NodeTrackingClientManager,
    RunFailed,
    clean_reason,
)
from core.finetune import build_finetune_model
from core.models import get_weights, set_weights
from core.results import MODEL_FILE, PREVIOUS_DIR, RESULTS_FILE, RunRecorder
from app.sweep import STATUS_FILE, job_outcome, write_summary
from strategies.factory import build_strategy
from tests.support.proxies import InProcessProxy


def run_rounds(overrides: str, tmp_path, num_nodes: int = 2, num_rounds: int = 2):
    """The ServerApp's round loop (ExperimentServer + the configured strategy stack) over
    `num_nodes` real clients of the default data set."""
    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    model, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    test = load_client_data(cfg.dataset, cfg.partitioner, 0, num_nodes, cfg.seed)[0]

    def evaluate_centrally(server_round, weights, config):
        set_weights(model, weights, wire)
        metrics = evaluate(model, test, spec.task, torch.device("cpu"))
        return metrics.pop("loss"), metrics

    strategy = build_strategy(cfg, ndarrays_to_parameters(get_weights(model, wire)), evaluate_centrally)
    recorder = RunRecorder(tmp_path, cfg, token="t0")
    manager = NodeTrackingClientManager()
    for i in range(num_nodes):
        context = Context(
            run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
            node_config={"partition-id": i, "num-partitions": num_nodes},
        )  # fmt: skip
        manager.register(InProcessProxy(str(100 + i), build_client(cfg, context)))
    server = ExperimentServer(client_manager=manager, strategy=strategy, recorder=recorder)
    history, _ = server.fit(num_rounds=num_rounds, timeout=None)
    return server, recorder, history


def test_rejected_updates_count_as_failed_with_their_node_and_the_run_fails(tmp_path):
    # lr=1e30 is finite and > 0, so config accepts it; every client's update comes back
    # non-finite and is rejected: nothing is ever aggregated.
    server, recorder, _ = run_rounds(
        "training.lr=1e30 training.local_epochs=1 strategy.fraction_train=1.0 "
        "strategy.fraction_evaluate=0", tmp_path,
    )  # fmt: skip
    rounds = recorder.rounds
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["aggregated"] is False
        assert r["clients"]["trained"] == 0 and r["clients"]["failed"] == 2
        failures = r["clients"]["failures"]
        assert sorted(f["node_id"] for f in failures) == ["100", "101"]
        assert all(f["reason"].startswith("rejected update: tensor") for f in failures)
        assert all("non-finite values" in f["reason"] for f in failures)
    assert server.rounds_aggregated == 0
    with pytest.raises(RunFailed) as info:
        server.check_trained()
    assert "no client update was aggregated in any of 2 rounds" in str(info.value)
    assert "non-finite values" in str(info.value)  # the first failure's cause
    assert not (tmp_path / MODEL_FILE).exists()


def test_a_healthy_run_aggregates_every_round_and_leaves_flower_no_history_to_dump(tmp_path):
    server, recorder, history = run_rounds("strategy.fraction_train=1.0", tmp_path)
    assert [r["aggregated"] for r in recorder.rounds] == [True, True]
    assert [r["clients"]["trained"] for r in recorder.rounds] == [2, 2]
    server.check_trained()  # does not raise
    assert str(history) == ""  # Flower's run_fl logs str(history) line by line after the run


def test_clients_without_validation_data_do_not_crash_federated_evaluation(tmp_path):
    # val_fraction=0: every client holds no validation split (once: KeyError 'loss')
    cfg = load_config("dataset.val_fraction=0")
    context = Context(
        run_id=1, node_id=5, state=RecordDict(), run_config={},
        node_config={"partition-id": 0, "num-partitions": 4},
    )  # fmt: skip
    client = build_client(cfg, context)
    from flwr.common import EvaluateIns, GetParametersIns

    weights = client.get_parameters(GetParametersIns({})).parameters

    res = client.evaluate(EvaluateIns(weights, {}))
    assert (res.loss, res.num_examples, res.metrics) == (0.0, 0, {})
    # a federated evaluation round where some clients have no examples: they weigh nothing
    server, recorder, _ = run_rounds(
        "strategy.fraction_train=1.0 strategy.fraction_evaluate=1.0", tmp_path / "mixed", 2, 1
    )  # fmt: skip
    assert "failures" not in recorder.rounds[0]["clients"]
    strategy = server.strategy
    proxy = next(iter(server.client_manager().all().values()))
    from flwr.common import Code, EvaluateRes, Status

    empty = EvaluateRes(Status(Code.OK, ""), 0.0, 0, {})
    full = EvaluateRes(Status(Code.OK, ""), 0.25, 40, {"accuracy": 0.5})
    assert strategy.aggregate_evaluate(1, [(proxy, empty)], []) == (None, {})
    loss, metrics = strategy.aggregate_evaluate(1, [(proxy, empty), (proxy, full)], [])
    assert loss == 0.25 and metrics == {"accuracy": 0.5}


def test_more_supernodes_than_examples_is_named_not_an_index_error():
    cfg = load_config("")
    with pytest.raises(ValueError) as info:
        load_client_data(cfg.dataset, cfg.partitioner, 1999, 2000, 0)
    assert "has 1437 examples for the clients: every SuperNode needs at least one" in str(info.value)


# --------------------------------------------------------------------------- reasons
RAY_FAILURE = (
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=10.0.0.7, actor_id=abc123, "
    "repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor object at 0x7f>)\n"
    + "".join(f'  File "/srv/app/module_{i}.py", line {i}, in step_{i}\n    call_{i}()\n' for i in range(80))
    + "\x1b[31mclients.ddp.DDPTimeoutError: DDP training ran past training.ddp_timeout_s=0.01 s\x1b[0m\n"
)


def test_failure_reasons_drop_colours_and_ray_headers_and_keep_the_cause():
    reason = clean_reason(RAY_FAILURE)
    assert "\x1b" not in reason and "ray::ClientAppActor" not in reason and "pid=4242" not in reason
    assert reason.endswith("DDPTimeoutError: DDP training ran past training.ddp_timeout_s=0.01 s")
    assert len(reason) == MAX_REASON_CHARS and reason.startswith("...")
    short = "ValueError: bad partition"
    assert clean_reason(short) == short


# --------------------------------------------------------------------------- run directories
def finished_run(directory, token, accuracy):
    cfg = load_config("model=linear")
    recorder = RunRecorder(directory, cfg, token=token)
    recorder.add_round({"round": 1, "centralized": {"loss": 1.0, "accuracy": accuracy}})
    model = torch.nn.Linear(64, 10)
    recorder.finish({"rounds_completed": 1, "centralized": {"accuracy": accuracy}}, model)
    return recorder


def test_a_new_run_moves_the_previous_runs_artifacts_out_of_its_directory(tmp_path):
    finished_run(tmp_path, "first", 0.9)
    (tmp_path / "flwr.log").write_text("log of the first run\n")
    second = RunRecorder(tmp_path, load_config("model=linear"), token="")  # plain `flwr run`
    assert second.archived == tmp_path / PREVIOUS_DIR / "first"
    results = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert results["run"] == {"token": "", "flwr_run_id": None, "status": "running"}
    assert results["rounds"] == [] and results["final"] == {}
    assert not (tmp_path / MODEL_FILE).exists() and not (tmp_path / "metrics.png").exists()
    assert not (tmp_path / "flwr.log").exists()  # no launcher wrote this run's log
    old = json.loads((tmp_path / PREVIOUS_DIR / "first" / RESULTS_FILE).read_text())
    assert old["run"]["status"] == "completed" and old["final"]["centralized"]["accuracy"] == 0.9
    assert (tmp_path / PREVIOUS_DIR / "first" / "flwr.log").read_text() == "log of the first run\n"
    second.fail("RunFailed: nothing aggregated")
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["run"]["status"] == "failed"


def test_the_launcher_trusts_only_this_runs_completed_results(tmp_path):
    finished_run(tmp_path, "old-token", 0.9)
    completed = {"run-id": "7", "status": "finished:completed", "status-details": ""}
    stale = job_outcome(tmp_path, "new-token", 0, completed)
    assert stale["status"] == "failed"
    assert stale["reason"] == "results.json belongs to another run (its run token differs)"
    failed = {"run-id": "8", "status": "finished:failed",
              "status-details": "Simulation failed with exception: boom"}  # fmt: skip
    outcome = job_outcome(tmp_path, "old-token", 0, failed)
    assert outcome["status"] == "failed"
    assert outcome["reason"].startswith("Flower reports the run finished:failed")
    ok = job_outcome(tmp_path, "old-token", 0, completed)
    assert ok["status"] == "ok" and ok["final"]["centralized"]["accuracy"] == 0.9
    assert json.loads((tmp_path / STATUS_FILE).read_text())["status"] == "ok"


def test_summary_has_a_row_for_a_failed_job_with_its_reason(tmp_path):
    finished_run(tmp_path / "0", "a", 0.8)
    job_outcome(tmp_path / "0", "a", 0, {"run-id": "1", "status": "finished:completed"})
    (tmp_path / "1").mkdir()
    RunRecorder(tmp_path / "1", load_config("model=linear"), token="b").fail("RunFailed: x")
    job_outcome(tmp_path / "1", "b", 0, {"run-id": "2", "status": "finished:failed"})
    rows = list(csv.DictReader(write_summary(tmp_path).open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "failed")]
    assert rows[0]["centralized_accuracy"] == "0.8" and rows[0]["reason"] == ""
    assert rows[1]["reason"] == "RunFailed: x"


# --------------------------------------------------------------------------- console
@pytest.mark.integration  # a fresh interpreter: the import order of a real process
def test_a_flower_log_line_prints_once_after_opacus_is_imported():
    code = (
        "import logging\n"
        "import protections.dp.dpsgd\n"  # imports opacus, whose module_utils calls basicConfig()
        "from flwr.common.logger import log\n"
        "log(logging.INFO, 'marker-%s', 'once')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("marker-once") == 1
