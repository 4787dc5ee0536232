"""strategy.evaluate_with_train: federated evaluation carried by the next round's train
messages (one message per node per round instead of two), in the real round loop over real
clients (tests/support/rounds.py).

With every client sampled for training and for evaluation, each round's model is evaluated on
the same validation splits either way, so the two runs must record the same federated metrics,
round for round; the fused one sends evaluate messages in the last round only."""

from __future__ import annotations

import json
import math

import pytest

from app.config import load_config
from app.experiment_server import received_evaluations
from core.config import ConfigError
from core.evaluation import EVALUATE_RECEIVED_KEY, RECEIVED_EVAL_PREFIX
from strategies.factory import fit_config_fn
from tests.support.proxies import LoopbackProxy, fit_res
from tests.support.rounds import in_process_run

FULL = "num_rounds=3 strategy.fraction_train=1.0 strategy.fraction_evaluate=1.0"
FUSED = f"{FULL} strategy.evaluate_with_train=true"


class CountingProxy:
    """Wraps a node's proxy and counts its fit and evaluate calls."""

    def __init__(self, proxy, calls: list) -> None:
        self.proxy, self.calls = proxy, calls

    def __getattr__(self, name):
        return getattr(self.proxy, name)

    def fit(self, ins, timeout, group_id):
        self.calls.append(("fit", group_id))
        return self.proxy.fit(ins, timeout, group_id)

    def evaluate(self, ins, timeout, group_id):
        self.calls.append(("evaluate", group_id))
        return self.proxy.evaluate(ins, timeout, group_id)


def counted(run) -> list:
    calls: list = []
    manager = run.server.client_manager()
    for cid, proxy in manager.clients.items():
        proxy.inner = CountingProxy(proxy.inner, calls)  # under the node-naming proxy
    return calls


def test_fused_evaluation_records_the_metrics_of_separate_evaluate_messages_round_for_round(tmp_path):
    fused = in_process_run(FUSED, tmp_path / "fused", num_nodes=3, seed=1)
    calls = counted(fused)
    fused.fit()
    separate = in_process_run(FULL, tmp_path / "separate", num_nodes=3, seed=1).fit()

    got, want = fused.recorder.record.rounds, separate.recorder.record.rounds
    assert [r.federated for r in got] == [r.federated for r in want]
    assert all(r.federated and 0.5 < r.federated["accuracy"] <= 1 for r in got)
    assert [r.federated_skipped for r in got] == [None, None, None]  # nothing skipped
    assert [r.centralized for r in got] == [r.centralized for r in want]  # same models
    for a, b in zip(got, want):  # the eval/ metrics left the train metrics
        assert not any(k.startswith(RECEIVED_EVAL_PREFIX) for k in a.train)
        assert a.train["train_loss"] == b.train["train_loss"]
    # 3 nodes: a train message each round, evaluate messages in the last round only
    assert sorted(calls) == sorted([("fit", r) for r in (1, 2, 3) for _ in range(3)] + [("evaluate", 3)] * 3)
    # one model download less per node per round but the last
    assert [r.comm.bytes_down < s.comm.bytes_down for r, s in zip(got, want)] == [True, True, False]
    # results.json on disk has the rounds' federated metrics written after them
    written = json.loads((tmp_path / "fused" / "results.json").read_text())
    assert [r["federated"]["accuracy"] for r in written["rounds"]] == [r.federated["accuracy"] for r in want]


def test_round_one_sends_no_evaluation_request_and_later_rounds_send_the_evaluation_settings():
    configure = fit_config_fn(load_config(f"{FUSED} evaluation.threshold=0.3"))
    assert EVALUATE_RECEIVED_KEY not in configure(1)  # the initial model: not evaluated
    second = configure(2)
    assert second[EVALUATE_RECEIVED_KEY] is True and second["eval_threshold"] == 0.3
    assert EVALUATE_RECEIVED_KEY not in fit_config_fn(load_config(FULL))(2)  # off by default


def test_per_site_metrics_come_with_the_fused_evaluation(tmp_path):
    run = in_process_run(f"{FUSED} evaluation.per_site=true", tmp_path, num_nodes=3, seed=1).fit()
    first = run.recorder.record.rounds[0]
    assert sorted(first.federated_sites) == ["partition-0", "partition-1", "partition-2"]
    sites = first.federated_sites.values()
    mean = sum(s["accuracy"] * s["num_examples"] for s in sites) / sum(s["num_examples"] for s in sites)
    assert math.isclose(mean, first.federated["accuracy"], rel_tol=1e-12)


class LyingEvaluation:
    """A node's proxy whose train replies carry a forged evaluation (NaN loss by default)."""

    def __init__(self, proxy, key: str = "loss", value=float("nan")) -> None:
        self.proxy, self.key, self.value = proxy, key, value

    def __getattr__(self, name):
        return getattr(self.proxy, name)

    def fit(self, ins, timeout, group_id):
        res = self.proxy.fit(ins, timeout, group_id)
        if f"{RECEIVED_EVAL_PREFIX}loss" in res.metrics:
            res.metrics[f"{RECEIVED_EVAL_PREFIX}{self.key}"] = self.value
        return res


def test_a_forged_evaluation_in_a_train_reply_is_recorded_and_the_round_goes_on(tmp_path):
    run = in_process_run(FUSED, tmp_path / "liar", num_nodes=3, seed=1)
    liar = run.server.client_manager().clients["100"]
    liar.inner = LyingEvaluation(liar.inner)
    run.fit()
    honest = in_process_run(FUSED, tmp_path / "honest", num_nodes=3, seed=1).fit()
    rounds = run.recorder.record.rounds
    assert [r.clients.trained for r in rounds] == [3, 3, 3]  # its update still counts
    for r in rounds[1:]:  # rounds 2 and 3 carried evaluations: the liar's was refused
        (failure,) = r.clients.failures
        assert (failure.node_id, failure.stage) == ("100", "evaluate")
        assert f"evaluation of round {r.round - 1}'s model not recorded" in failure.reason
        assert "loss nan" in failure.reason
    assert rounds[0].clients.failures is None
    # round 1's federated: the two honest nodes' evaluation only, a finite number
    first = rounds[0].federated
    assert math.isfinite(first["loss"]) and first != honest.recorder.record.rounds[0].federated


def test_two_clients_claiming_1e308_examples_cannot_crash_the_run(tmp_path):
    """Each count is finite and whole; their sum would overflow Flower's weighted mean."""
    run = in_process_run(FUSED, tmp_path, num_nodes=3, seed=1)
    for cid in ("100", "101"):
        node = run.server.client_manager().clients[cid]
        node.inner = LyingEvaluation(node.inner, "num_examples", 1e308)
    run.fit()
    rounds = run.recorder.record.rounds
    assert [r.clients.trained for r in rounds] == [3, 3, 3]
    assert sorted(f.node_id for f in rounds[1].clients.failures) == ["100", "101"]
    assert math.isfinite(rounds[0].federated["loss"])  # node 102's evaluation alone
    json.loads((tmp_path / "results.json").read_text())  # valid JSON: no NaN or Infinity


@pytest.mark.parametrize(
    "metrics, problem",
    [
        ({"eval/loss": 0.5, "eval/num_examples": -3}, "num_examples -3"),
        ({"eval/loss": "0.5", "eval/num_examples": 4}, "loss '0.5'"),
        ({"eval/loss": 0.5, "eval/num_examples": 2.5}, "num_examples 2.5"),
        ({"eval/loss": 0.5, "eval/num_examples": True}, "num_examples True"),
        ({"eval/num_examples": 4}, "loss None"),
        ({"eval/loss": float("inf"), "eval/num_examples": 4}, "loss inf"),
        ({"eval/loss": 0.5, "eval/num_examples": 1e308}, "num_examples 1e+308"),
        ({"eval/loss": 0.5, "eval/num_examples": 2**31 + 1}, f"num_examples {2**31 + 1}"),
        ({"eval/loss": 0.5, "eval/num_examples": 4, "eval/accuracy": float("nan")}, "metric accuracy nan"),
        ({"eval/loss": 0.5, "eval/num_examples": 4, "eval/accuracy": "high"}, "metric accuracy 'high'"),
    ],
)
def test_each_malformed_evaluation_is_refused_naming_the_field(metrics, problem):
    res = fit_res([], 10)
    res.metrics = {"train_loss": 0.1, **metrics}
    evaluations, problems = received_evaluations([(LoopbackProxy("7"), res)])
    assert evaluations == []
    ((node, why),) = problems
    assert node == "7" and problem in why
    assert res.metrics == {"train_loss": 0.1}  # the eval/ metrics leave the reply either way


def test_a_well_formed_evaluation_becomes_the_evaluate_result_it_stands_for():
    res = fit_res([], 10)
    res.metrics = {"train_loss": 0.1, "eval/loss": 0.25, "eval/num_examples": 4, "eval/accuracy": 0.75}
    ((proxy, ev),), problems = received_evaluations([(LoopbackProxy("7"), res)])
    assert problems == [] and proxy.cid == "7"
    assert (ev.loss, ev.num_examples, ev.metrics) == (0.25, 4, {"accuracy": 0.75})
    assert res.metrics == {"train_loss": 0.1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("strategy.evaluate_every=2", r"strategy\.evaluate_with_train=True: .*strategy\.evaluate_every=2 has no evaluate message to save"),
        ("strategy.fraction_evaluate=0", r"strategy\.evaluate_with_train=True: the run has no federated evaluation .*fraction_evaluate=0"),
        ("dataset.val_fraction=0", r"strategy\.evaluate_with_train=True: the run has no federated evaluation .*val_fraction=0\)"),
        ("privacy=server_fixed", r"strategy\.evaluate_with_train=True: under privacy=server_fixed federated evaluation is off"),
    ],
)
def test_evaluate_with_train_without_a_federated_evaluation_to_move_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(f"strategy.evaluate_with_train=true {overrides}")


def test_under_unprotected_metrics_dp_runs_accept_it():
    cfg = load_config("strategy.evaluate_with_train=true privacy=server_fixed privacy.unprotected_metrics=true")
    assert cfg.strategy.evaluate_with_train


def test_a_resume_with_more_rounds_keeps_the_last_rounds_own_evaluation(tmp_path):
    """2 rounds (round 2, the last, evaluated by evaluate messages to all 3 nodes), then
    resume=true with num_rounds=4: round 3's train replies (2 of the 3 nodes) evaluate round
    2's model again, and round 2 keeps the measurement it has; round 3 gets its own from
    round 4's train replies."""
    from app.checkpoint import load, save
    from core.config import resolved_yaml

    out = tmp_path / "run"
    holder = {}

    def checkpoint(server_round, arrays, state):
        save(out, server_round, arrays, state, holder["run"].recorder.results, resolved_yaml(holder["run"].cfg))

    two_train = "strategy.fraction_train=0.6 strategy.min_train_clients=2"  # 2 of 3 train
    first = f"{FUSED} {two_train} num_rounds=2"
    holder["run"] = in_process_run(first, out, num_nodes=3, seed=1, checkpoint_fn=checkpoint)
    holder["run"].fit()
    before = [r.federated for r in holder["run"].recorder.record.rounds]
    assert all(before)
    resumed = in_process_run(f"{FUSED} {two_train} num_rounds=4", out, num_nodes=3, seed=1, resume=load(out))
    recorded = []
    update = resumed.recorder.update_round
    resumed.recorder.update_round = lambda r, **parts: (recorded.append(r), update(r, **parts))
    resumed.fit()
    rounds = resumed.recorder.record.rounds
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert [r.federated for r in rounds[:2]] == before
    assert recorded == [3]  # round 3's train replies measured round 2 again: not recorded
    assert rounds[2].federated and rounds[3].federated


class LyingEvaluateReply:
    """A node's proxy whose evaluate replies carry a forged accuracy."""

    def __init__(self, proxy, value) -> None:
        self.proxy, self.value = proxy, value

    def __getattr__(self, name):
        return getattr(self.proxy, name)

    def evaluate(self, ins, timeout, group_id):
        res = self.proxy.evaluate(ins, timeout, group_id)
        res.metrics["accuracy"] = self.value
        return res


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} in {path.name}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "high"])
def test_an_evaluate_reply_that_is_not_numbers_is_refused_and_recorded(tmp_path, value):
    """The evaluate messages' replies get the same check as the train replies' evaluations:
    one NaN accuracy made the round's federated accuracy NaN and results.json not JSON."""
    run = in_process_run(FULL, tmp_path, num_nodes=3, seed=1)
    node = run.server.client_manager().clients["101"]
    node.inner = LyingEvaluateReply(node.inner, value)
    run.fit()
    for r in run.recorder.record.rounds:
        (failure,) = r.clients.failures
        assert (failure.node_id, failure.stage) == ("101", "evaluate")
        assert f"refused evaluation: metric accuracy {value!r}: not a finite number" in failure.reason
        assert 0.5 < r.federated["accuracy"] <= 1  # the two other nodes'
    assert all(r["federated"] for r in strict_json(tmp_path / "results.json")["rounds"])


def test_finite_values_whose_average_overflows_are_not_recorded(tmp_path):
    """1e308 passes each client's check; times an example count it is inf. Neither the
    evaluate messages' average nor the train replies' is recorded then, and results.json
    stays JSON."""
    separate = in_process_run(FULL, tmp_path / "separate", num_nodes=3, seed=1)
    node = separate.server.client_manager().clients["101"]
    node.inner = LyingEvaluateReply(node.inner, 1e308)
    separate.fit()
    assert [r.federated for r in separate.recorder.record.rounds] == [None, None, None]
    strict_json(tmp_path / "separate" / "results.json")

    fused = in_process_run(FUSED, tmp_path / "fused", num_nodes=3, seed=1)
    node = fused.server.client_manager().clients["101"]
    node.inner = LyingEvaluation(node.inner, "loss", 1e308)
    fused.fit()
    assert [r.federated is None for r in fused.recorder.record.rounds] == [True, True, False]
    strict_json(tmp_path / "fused" / "results.json")
