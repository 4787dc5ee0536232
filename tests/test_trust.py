"""Runs you can trust (issue 17), without Ray: the round loop with real in-process clients,
the run directory and the launcher's verdict on real files, and the log handlers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters

from app.client_app import build_client
from app.config import load_config
from core.data import data_spec, load_client_data
from core.evaluation import evaluate
from app.experiment_server import (
    MAX_REASON_CHARS,
    ClientWaitTimeout,
    ExperimentServer,
    NodeTrackingClientManager,
    RunFailed,
    clean_reason,
    partition_ids_by_registration,
)
from core.finetune import build_finetune_model
from core.models import get_weights, set_weights
from core.results import MODEL_FILE, PREVIOUS_DIR, RESULTS_FILE, RunRecorder
from app.server_app import (
    DISPATCH_CHECKS_WARN,
    NODE_WAIT_S,
    SIMULATION_NODE_WAIT_S,
    client_wait_timeout,
    dispatch_warnings,
    federation_mismatch,
    point_latest,
    start_line,
)
from app.sweep import STATUS_FILE, job_outcome, stream_process, write_summary
from strategies.factory import build_strategy
from tests.support.proxies import InProcessProxy, LoopbackProxy
from tests.support.rounds import in_process_run


def run_rounds(overrides: str, tmp_path, num_nodes: int = 2, num_rounds: int = 2, node_ids=None, seed=None):
    """The ServerApp's round loop over `num_nodes` real clients (tests/support/rounds.py);
    `node_ids[i]`: partition i's node id; `seed`: the client manager's sampling seed."""
    run = in_process_run(overrides, tmp_path, num_nodes=num_nodes, node_ids=node_ids, seed=seed)
    run.fit(num_rounds)
    return run.server, run.recorder, run.history


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


# --------------------------------------------------------------------------- reproducible
def partition_clients(cfg, num_nodes):
    """One real client per partition (what each SuperNode's ClientApp builds)."""
    clients = []
    for i in range(num_nodes):
        context = Context(
            run_id=1, node_id=i, state=RecordDict(), run_config={},
            node_config={"partition-id": i, "num-partitions": num_nodes},
        )  # fmt: skip
        clients.append(build_client(cfg, context))
    return clients


def cohorts(clients, node_ids, seed, rounds=4, size=3, known=None, asked=None):
    """The partitions a seeded manager samples in each round, with partition i on node_ids[i].
    `known`: the manager's known_partition_ids; `asked`: a list that gets each node asked for
    its partition id."""
    manager = NodeTrackingClientManager(seed=seed, known_partition_ids=known)
    partition_of = {}
    for i, (client, node) in enumerate(zip(clients, node_ids)):
        proxy = InProcessProxy(str(node), client)
        if asked is not None:
            answer = proxy.get_properties
            proxy.get_properties = lambda ins, t, g, f=answer, n=node: (asked.append(n), f(ins, t, g))[1]
        manager.register(proxy)
        partition_of[str(node)] = i
    out = []
    for server_round in range(1, rounds + 1):
        manager.begin_round(server_round)
        out.append(sorted(partition_of[p.cid] for p in manager.sample(size)))
    return out


def test_seeded_sampling_draws_the_same_partitions_whatever_the_node_ids():
    clients = partition_clients(load_config(""), 8)
    ids_a = [5_000 + 17 * i for i in range(8)]
    ids_b = [9_999_999 - 31 * i for i in range(8)]  # other ids, in the reverse order
    first = cohorts(clients, ids_a, seed=3)
    assert cohorts(clients, ids_b, seed=3) == first  # the partition ids fix the order
    assert len({tuple(c) for c in first}) > 1  # rounds draw different cohorts
    assert all(len(c) == 3 and len(set(c)) == 3 for c in first)
    assert cohorts(clients, ids_a, seed=4) != first


def test_nodes_without_a_partition_id_are_ordered_by_node_id_after_the_others():
    clients = partition_clients(load_config(""), 2)
    manager = NodeTrackingClientManager(seed=0)
    manager.register(InProcessProxy("900", clients[1]))  # answers partition 1
    manager.register(LoopbackProxy("7"))  # cannot answer: get_properties raises
    manager.register(LoopbackProxy("30"))
    manager.register(InProcessProxy("901", clients[0]))  # answers partition 0
    manager.begin_round(1)
    assert len(manager.sample(4)) == 4
    assert manager.partition_ids == {"900": 1, "901": 0}
    assert manager.stable_order(manager.all()) == ["901", "900", "7", "30"]


def test_known_partition_ids_send_no_message_but_the_first_cohorts_and_draw_the_same_cohorts():
    # A simulation of 10,000 nodes asked each one: 10,000 messages before round 1.
    clients = partition_clients(load_config(""), 8)
    ids = [9_999_999 - 31 * i for i in range(8)]
    asked_all: list[int] = []
    reference = cohorts(clients, ids, seed=3, asked=asked_all)
    assert sorted(asked_all) == sorted(ids)  # without known ids: every node, once
    asked: list[int] = []
    known = {str(node): i for i, node in enumerate(ids)}
    assert cohorts(clients, ids, seed=3, known=lambda: known, asked=asked) == reference
    assert len(asked) == 3 and {ids.index(n) for n in asked} == set(reference[0])  # the check


def test_wrong_known_partition_ids_fall_back_to_asking_every_node_with_the_same_cohorts():
    clients = partition_clients(load_config(""), 8)
    ids = [5_000 + 17 * i for i in range(8)]
    reference = cohorts(clients, ids, seed=3)
    asked: list[int] = []
    wrong = {str(node): 7 - i for i, node in enumerate(ids)}  # not what the nodes answer
    assert cohorts(clients, ids, seed=3, known=lambda: wrong, asked=asked) == reference
    assert sorted(set(asked)) == sorted(ids) and len(asked) == 8  # the check's 3, then the rest
    unknown: list[int] = []  # known_partition_ids that cannot tell (None): every node asked
    assert cohorts(clients, ids, seed=3, known=lambda: None, asked=unknown) == reference
    assert sorted(unknown) == sorted(ids)


def test_partition_ids_follow_the_simulations_registration_order():
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

    def node(node_id, microsecond):
        return NodeInfo(node_id=node_id, registered_at=f"2026-01-01T00:00:00.{microsecond:06d}+00:00")

    # registered 30 (partition 0), then 9, then 70; listed in another order
    nodes = [node(70, 31), node(30, 0), node(9, 2)]
    assert partition_ids_by_registration(nodes) == {"30": 0, "9": 1, "70": 2}
    # isoformat() drops a zero microsecond: still ordered by time
    whole = NodeInfo(node_id=5, registered_at="2026-01-01T00:00:00+00:00")
    assert partition_ids_by_registration([node(4, 1), whole]) == {"5": 0, "4": 1}
    assert partition_ids_by_registration([node(1, 5), node(2, 5)]) is None  # a tie: ask
    assert partition_ids_by_registration([NodeInfo(node_id=3)]) is None  # Grid.get_nodes' default


def test_same_seed_same_model_bit_for_bit_whatever_the_node_ids(tmp_path):
    overrides = "strategy.fraction_train=0.5 strategy.fraction_evaluate=0.5"
    runs = []
    for name, ids in (("a", [11, 12, 13, 14]), ("b", [987654, 3, 55555, 42])):
        server, recorder, _ = run_rounds(overrides, tmp_path / name, 4, 2, node_ids=ids, seed=0)
        arrays = [a.copy() for a in server.strategy.global_model.arrays(server.parameters)]
        runs.append((arrays, [r["centralized"] for r in recorder.rounds]))
    (arrays_a, metrics_a), (arrays_b, metrics_b) = runs
    assert len(arrays_a) == len(arrays_b) > 0
    assert all(np.array_equal(a, b) for a, b in zip(arrays_a, arrays_b))
    assert metrics_a == metrics_b and len(metrics_a) == 2


def test_results_are_aggregated_in_the_stable_node_order_not_completion_order():
    manager = NodeTrackingClientManager(seed=0)
    for cid in ("40", "3", "17"):
        manager.register(LoopbackProxy(cid))
    manager.partition_ids.update({"40": 0, "17": 1})  # "3" answered none
    server = ExperimentServer(client_manager=manager, strategy=None, recorder=None)
    results = [(manager.all()[cid], cid) for cid in ("3", "17", "40")]
    assert [res for _, res in server._in_stable_order(results)] == ["40", "17", "3"]


# --------------------------------------------------------------------------- no hangs
def test_a_wait_for_more_clients_than_connect_ends_with_the_numbers_and_the_keys():
    manager = NodeTrackingClientManager(seed=None, wait_timeout_s=0.3)
    for cid in ("1", "2", "3"):
        manager.register(LoopbackProxy(cid))
    started = time.monotonic()
    with pytest.raises(ClientWaitTimeout) as info:
        manager.sample(12)  # Flower's own sample would wait 24 h here
    assert 0.25 < time.monotonic() - started < 5
    assert str(info.value) == (
        "waited 0.3 s for 12 clients, 3 connected: lower strategy.min_available_clients to <= 3 "
        "or start more SuperNodes (or raise strategy.client_wait_timeout_s)"
    )
    assert manager.wait_for(3) is True  # enough: no wait, no error


def test_client_wait_timeout_key_defaults_and_refuses_non_positive_values():
    from core.config import ConfigError

    assert client_wait_timeout(load_config(""), simulation=True) == SIMULATION_NODE_WAIT_S == 10.0
    assert client_wait_timeout(load_config(""), simulation=False) == NODE_WAIT_S == 600.0
    cfg = load_config("strategy.client_wait_timeout_s=42.5")
    assert client_wait_timeout(cfg, simulation=False) == 42.5
    with pytest.raises(ConfigError) as info:
        load_config("strategy.client_wait_timeout_s=0")
    assert "strategy.client_wait_timeout_s=0.0: must be > 0 seconds" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("simulation.job_timeout_s=-5")
    assert "simulation.job_timeout_s=-5.0: must be > 0 seconds" in str(info.value)


def test_a_timed_out_job_is_a_failed_row_with_its_reason(tmp_path):
    finished_run(tmp_path / "0", "a", 0.8)  # even a complete results.json: the job was ended
    outcome = job_outcome(tmp_path / "0", "a", -15, None, timed_out_s=90)
    assert outcome["status"] == "failed"
    assert outcome["reason"] == "timed out after 90 s (simulation.job_timeout_s)"
    (row,) = list(csv.DictReader(write_summary(tmp_path).open()))
    assert (row["status"], row["reason"]) == ("failed", "timed out after 90 s (simulation.job_timeout_s)")


@pytest.mark.integration  # starts a process
def test_a_job_past_its_timeout_is_stopped_and_its_process_group_ended():
    lines, stops = [], []
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()
    returncode, timed_out = stream_process(
        [sys.executable, "-c", code], None, lines.append, 1.5, lambda: stops.append(True)
    )
    assert timed_out is True and stops == [True]
    assert returncode == -signal.SIGTERM
    assert time.monotonic() - started < 30
    child = int(lines[0].split()[1])
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    # the grandchild went with the group: gone, or a zombie no one has reaped yet
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    returncode, timed_out = stream_process([sys.executable, "-c", "print('done')"], None, lines.append, 30)
    assert (returncode, timed_out, lines[-1]) == (0, False, "done\n")


# --------------------------------------------------------------------------- what runs
def test_the_start_line_says_what_runs():
    cfg = load_config("num_rounds=3 strategy=fedprox")
    line = start_line(cfg, 4, 4810, Path("/runs/x"), simulation=True)
    assert line == (
        "Experiment: simulation of 4 SuperNodes, 3 rounds, strategy=fedprox privacy=none "
        "secagg=none, dataset=digits partitioner=iid model=mlp (4810 parameters), cohorts "
        "seeded (seed=0), results -> /runs/x"
    )
    dp = load_config("privacy=server_fixed")
    assert "cohorts from the OS CSPRNG (privacy)" in start_line(dp, 10, 1, Path("/r"), False)
    assert start_line(dp, 10, 1, Path("/r"), False).startswith("Experiment: deployment of 10 SuperNodes")


def test_a_federation_of_another_size_than_configured_is_named():
    cfg = load_config("")  # simulation.num_supernodes=10
    assert federation_mismatch(cfg, 10) is None
    warning = federation_mismatch(cfg, 3)
    assert warning.startswith("3 SuperNodes connected but simulation.num_supernodes=10")
    assert "flwr run . --federation-config 'num-supernodes=10'" in warning


def test_a_simulation_with_hundreds_of_messages_in_flight_is_warned_naming_the_key_and_the_fix():
    # Flower's dispatch sweep scans every message in flight for every node: N x M checks.
    assert DISPATCH_CHECKS_WARN == 200_000
    cfg = load_config("")  # fraction_train = fraction_evaluate = 0.5
    assert dispatch_warnings(cfg, 10) == []  # 10 x 5 checks
    assert dispatch_warnings(cfg, 400) == []  # 400 x 200 = 80,000
    train, evaluate = dispatch_warnings(cfg, 1000)  # 1000 x 500 = 500,000
    assert train.startswith(
        "Large simulation: strategy.fraction_train=0.5 puts 500 train messages in flight at once "
        "among 1000 SuperNodes. Flower's simulation engine scans every message in flight for "
        "every node on each dispatch sweep, and each message waits for a sweep: 1000 x 500 = "
        "500,000 checks, 1.0-2.5 s a sweep"
    )
    assert train.endswith("(at most 199 clients here): strategy.fraction_train=0.01 (10 clients a round)")
    assert "500 evaluate messages" in evaluate
    assert evaluate.endswith(
        "strategy.fraction_evaluate=0.01 (10 clients a round), or strategy.fraction_evaluate=0 "
        "(no federated evaluation)"
    )
    # the threshold, exactly: 1000 nodes x 199 messages passes, x 200 warns
    below, at = (load_config(f"strategy.fraction_train={f} strategy.fraction_evaluate=0") for f in (0.199, 0.2))
    assert dispatch_warnings(below, 1000) == []
    (at,) = dispatch_warnings(at, 1000)
    assert "puts 200 train messages" in at and "200,000 checks" in at
    # a minimum that sets the cohort is the key named
    (by_min,) = dispatch_warnings(
        load_config("simulation.num_supernodes=1000 strategy.min_train_clients=300 "
                    "strategy.fraction_train=0.01 strategy.fraction_evaluate=0"),
        1000,
    )
    assert by_min.startswith("Large simulation: strategy.min_train_clients=300 puts 300 train messages")
    assert by_min.endswith(": strategy.min_train_clients=10")
    # no federated evaluation (no validation split): no evaluate messages, no warning for them
    (only_train,) = dispatch_warnings(load_config("dataset.val_fraction=0"), 1000)
    assert "train messages" in only_train


def test_latest_points_at_the_newest_run_and_is_replaced_atomically(tmp_path):
    root = tmp_path / "runs"
    first, second = root / "20260101-000000-run1", root / "20260101-000100-run2"
    for run_dir in (first, second):
        run_dir.mkdir(parents=True)
        (run_dir / RESULTS_FILE).write_text(run_dir.name)
    link = point_latest(root, first)
    assert link == root / "latest" and (link / RESULTS_FILE).read_text() == first.name
    point_latest(root, second)  # over an existing link: a plain os.symlink would raise
    assert os.readlink(link) == second.name  # relative: the runs tree can be moved
    assert (link / RESULTS_FILE).read_text() == second.name
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name, "latest"])
