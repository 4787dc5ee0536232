"""The round loop: Flower's legacy `Server` with every round recorded and logged.

`flwr.server.Server.fit` keeps its measurements in a `History` and logs Flower's own lines; we
need per-round wall time, traffic, client counts and metrics written to `results.json` as the
run goes, one readable log line per round, and (for the privacy budget) a say in whether the
next round runs. So `fit` is overridden; the round mechanics (`fit_round`, `evaluate_round`,
sampling, failures) stay Flower's.

Failures are recorded with the node and the reason. Flower's `Server` collects a failed client
call as a bare exception (the client proxy is lost), so the client manager below wraps each
node's proxy: its exceptions are re-raised as `ClientFailure` naming the node. That is how a
deployment's `results.json` says which round lost which SuperNode, and why (e.g. Flower's
"Node Unavailable" once a killed SuperNode misses its heartbeats). Reasons are cleaned
(:func:`clean_reason`: no ANSI colours or Ray actor headers, the end of a long traceback kept,
where the cause is). Updates the strategy rejects (non-finite, wrong shape, foreign
ciphertext) count as failed, with their node, not as trained.

Each round is recorded as a `RoundRecord` (core/results.py): the loop fills its own
measurements, every layer of the strategy stack its section (`contribute`, protections/base.py),
and the console line is printed from the same record. The global model is decoded once per round
(`strategy.global_model`, protections/base.py) for the layers, centralized evaluation and the
checkpoint.

A round in which no update was aggregated says so (`"aggregated": false`); a run in which no
round aggregated anything raises :class:`RunFailed`: the ServerApp then fails the run (Flower
marks it `finished:failed`) and writes no model.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from logging import INFO, WARNING
from typing import Any

from flwr.common import Code, EvaluateRes, GetPropertiesIns, Status, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import History, Server
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.server import evaluate_clients, fit_clients

from clients.torch_client import PARTITION_ID_PROPERTY
from core.evaluation import RECEIVED_EVAL_PREFIX
from core.results import ClientCounts, FailureRecord, RoundRecord, RunRecorder
from protections.base import StrategyWrapper


MAX_REASON_CHARS = 1500
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# Ray's header of an actor's error: "ray::ClientAppActor.run() (pid=1, ip=10.0.0.1, actor_id=..)"
RAY_HEADER = re.compile(r"^[ \t]*ray::[\w.]+\(\)([ \t]*\(pid=[^\n]*)?[ \t]*$", re.MULTILINE)


def clean_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A failure's text fit to keep: ANSI colour codes and Ray actor headers removed, blank
    lines dropped, and past `limit` characters the END kept (a traceback's last lines carry
    the exception type and message) behind a leading '...'."""
    text = RAY_HEADER.sub("", ANSI_ESCAPE.sub("", text))
    text = "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
    if len(text) > limit:
        text = "..." + text[-(limit - 3) :]
    return text


class RunFailed(RuntimeError):
    """No round of the run aggregated a client update: there is no trained model."""


class ClientFailure(RuntimeError):
    """A client call that failed, with the node it was sent to."""

    def __init__(self, node_id: str, stage: str, reason: str) -> None:
        super().__init__(f"node {node_id} ({stage}): {reason}")
        self.node_id, self.stage, self.reason = node_id, stage, reason


class NodeTrackingProxy(ClientProxy):
    """A node's proxy whose failures name the node (everything else is the inner proxy's)."""

    def __init__(self, inner: ClientProxy) -> None:
        super().__init__(inner.cid)
        self.inner = inner
        self.node_id = getattr(inner, "node_id", inner.cid)

    def _call(self, stage: str, method, *args):
        try:
            return method(*args)
        except Exception as err:  # whatever the transport raised: keep its text
            reason = clean_reason(str(err) or type(err).__name__)
            raise ClientFailure(str(self.cid), stage, reason) from err

    def fit(self, ins, timeout, group_id):
        return self._call("train", self.inner.fit, ins, timeout, group_id)

    def evaluate(self, ins, timeout, group_id):
        return self._call("evaluate", self.inner.evaluate, ins, timeout, group_id)

    def get_parameters(self, ins, timeout, group_id):
        return self._call("get_parameters", self.inner.get_parameters, ins, timeout, group_id)

    def get_properties(self, ins, timeout, group_id):
        return self._call("get_properties", self.inner.get_properties, ins, timeout, group_id)

    def reconnect(self, ins, timeout, group_id):
        return self.inner.reconnect(ins, timeout, group_id)


class ClientWaitTimeout(RuntimeError):
    """Fewer nodes than the strategy needs connected within strategy.client_wait_timeout_s."""


def client_wait_message(waited_s: float, wanted: int, connected: int, key: str = "min_available_clients") -> str:
    """The one text every wait for clients fails with (the ServerApp's wait before round 1,
    app/server_app.py wait_for_nodes, and the client manager's during the rounds)."""
    return (
        f"waited {waited_s:g} s for {wanted} clients, {connected} connected: lower "
        f"strategy.{key} to <= {connected} or start more SuperNodes (or raise "
        f"strategy.client_wait_timeout_s)"
    )


def partition_ids_by_registration(nodes: Iterable) -> dict[str, int] | None:
    """cid -> partition id of a simulation's nodes, from the order they registered in, or
    None when that order cannot be told (two nodes with one timestamp, or none).

    Flower's simulation engine registers node i for partition i, one after the other, before
    any message (flwr/server/superlink/fleet/vce/vce_api.py `_register_nodes`, and
    `_register_node_info_stores` gives node i `partition-id` i), and the link state stamps
    each node's NodeInfo.registered_at. A Flower release that registers otherwise is caught
    by NodeTrackingClientManager's check of the first cohort."""
    stamped = []
    for node in nodes:
        if not node.registered_at:
            return None
        stamped.append((datetime.fromisoformat(node.registered_at), str(node.node_id)))
    if len({stamp for stamp, _ in stamped}) != len(stamped):
        return None
    return {cid: rank for rank, (_, cid) in enumerate(sorted(stamped))}


class NodeTrackingClientManager(SimpleClientManager):
    """Flower's client manager, handing out proxies whose failures name their node; waits for
    clients that end after `wait_timeout_s` with :class:`ClientWaitTimeout` (Flower's own wait
    is up to 24 h); and, given a `seed`, sampling that is the same in every run.

    Seeded sampling: Flower's SimpleClientManager.sample draws with the global `random` over
    node ids, and in simulation node ids are fresh random numbers every run (Flower's
    flwr/server/superlink/fleet/vce/vce_api.py `_register_nodes`), so the same seed sampled
    other partitions each run. Here each node is asked once for its partition id
    (`get_properties`, answered by clients/torch_client.py) and nodes are put in a stable
    order: by partition id, then nodes without one (a deployment's SuperNodes started with a
    data file only) by node id, which in deployment is stable only as long as the SuperNodes
    keep their ids. Each round's cohort is drawn from `random.Random(f"{seed}/{round}")`
    over that order (:meth:`begin_round` sets the round). The same order sorts each round's
    results before aggregation (ExperimentServer), since sums of floats depend on order.

    Large simulations: asking costs one message per node, and Flower's simulation engine
    scans every message in flight for every node on each dispatch sweep (benchmarks/scale.py),
    so asking 10,000 nodes took minutes. Given `known_partition_ids` (app/server_app.py
    passes :func:`partition_ids_by_registration` over the simulation's nodes), the ids come
    from there without a message, and only the first cohort drawn is asked, as a check: one
    wrong answer and every node is asked after all (logged), and the cohort is drawn again
    from the same generator state, so the cohorts are those the asking path draws.

    No seed (any privacy mode, app/server_app.py): Flower's sampling. A client-level DP
    cohort never comes from here anyway: protections/dp/sampling.py PrivateCohort draws it
    from the OS CSPRNG over `all()`, which is what the privacy accounting assumes.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        wait_timeout_s: float = 86400.0,
        known_partition_ids: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        super().__init__()
        self.seed = seed
        self.wait_timeout_s = wait_timeout_s
        self.partition_ids: dict[str, int | None] = {}  # cid -> its answer, once per node
        self.known_partition_ids = known_partition_ids
        self._unchecked: set[str] = set()  # ids from known_partition_ids, no node asked yet
        self._rng = random.Random(f"{seed}/0")

    def register(self, client: ClientProxy) -> bool:
        return super().register(NodeTrackingProxy(client))

    def wait_for(self, num_clients: int, timeout: float = 86400) -> bool:
        """Flower's wait, at most `wait_timeout_s`; raise ClientWaitTimeout when it ends short."""
        limit = min(float(timeout), self.wait_timeout_s)
        if super().wait_for(num_clients, timeout=limit):
            return True
        raise ClientWaitTimeout(client_wait_message(limit, num_clients, len(self.clients)))

    def begin_round(self, server_round: int) -> None:
        """Draw this round's cohorts (fit, then evaluate) from a generator of (seed, round)."""
        self._rng = random.Random(f"{self.seed}/{server_round}")

    def _query_partition_ids(self, cids: list[str]) -> dict[str, int | None]:
        """Ask each node in `cids` for its partition id (None: it has none); nodes that
        cannot answer now are left out (ordered by node id, asked again later)."""
        ins = GetPropertiesIns({PARTITION_ID_PROPERTY: ""})

        def ask(cid: str) -> int | None:
            try:
                # No TTL of our own: like fit's (ServerConfig.round_timeout=None). The first
                # message of a simulation waits for Ray and the ClientApp to load (tens of s).
                res = self.clients[cid].get_properties(ins, None, None)
            except ClientFailure as err:
                log(WARNING, "node %s did not answer its partition id: %s", cid, err.reason)
                return -1
            value = res.properties.get(PARTITION_ID_PROPERTY)
            return None if value is None else int(value)

        with ThreadPoolExecutor(max_workers=min(32, len(cids))) as pool:
            return {cid: pid for cid, pid in zip(cids, pool.map(ask, cids)) if pid != -1}

    def _ask_partition_ids(self) -> None:
        unknown = [cid for cid in self.clients if cid not in self.partition_ids]
        if not unknown:
            return
        known = self.known_partition_ids() if self.known_partition_ids is not None else None
        if known is not None and all(cid in known for cid in unknown):
            self.partition_ids.update({cid: known[cid] for cid in unknown})
            self._unchecked.update(unknown)
            log(INFO, "seeded sampling: partition ids of %d nodes from their registration order, "
                "no message sent (the first cohort is asked, as a check)", len(unknown))  # fmt: skip
            return
        started = time.perf_counter()
        self.partition_ids.update(self._query_partition_ids(unknown))
        log(INFO, "seeded sampling: asked %d nodes for their partition id (%.1f s)",
            len(unknown), time.perf_counter() - started)  # fmt: skip

    def _known_ids_hold(self, cohort: list[str]) -> bool:
        """The check of known_partition_ids, on the first cohort that has nodes whose ids
        came from it: ask those nodes; True when every answer is the id known (then the
        other known ids are trusted: no more checks). A wrong one: forget every id not
        asked for, and stop using known_partition_ids (the caller asks every node)."""
        asked = [cid for cid in cohort if cid in self._unchecked]
        if not asked:
            return True
        answers = self._query_partition_ids(asked)
        wrong = {cid: pid for cid, pid in answers.items() if pid != self.partition_ids[cid]}
        if not wrong:
            log(INFO, "seeded sampling: the %d nodes of the first cohort answered the partition "
                "ids of the registration order", len(answers))  # fmt: skip
            self._unchecked.clear()
            return True
        self._unchecked.difference_update(answers)
        cid, pid = next(iter(wrong.items()))
        log(WARNING, "seeded sampling: node %s answered partition id %s, not %s from the registration "
            "order: asking every node instead", cid, pid, self.partition_ids[cid])  # fmt: skip
        for other in self._unchecked:
            del self.partition_ids[other]
        self._unchecked.clear()
        self.partition_ids.update(answers)
        self.known_partition_ids = None
        return False

    def order_key(self, cid: str) -> tuple:
        """Stable position of a node: (0, partition id) where known, else (1, node id)."""
        pid = self.partition_ids.get(cid)
        node = int(cid) if cid.lstrip("-").isdigit() else cid
        return (0, pid, node) if pid is not None else (1, node, 0)

    def stable_order(self, cids) -> list[str]:
        return sorted(cids, key=self.order_key)

    def sample(self, num_clients, min_num_clients=None, criterion=None) -> list[ClientProxy]:
        if self.seed is None:
            return super().sample(num_clients, min_num_clients, criterion)
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        self._ask_partition_ids()
        cids = [c for c in self.clients if criterion is None or criterion.select(self.clients[c])]
        if num_clients > len(cids):
            log(INFO, "Sampling failed: %d clients available, %d requested", len(cids), num_clients)
            return []
        before = self._rng.getstate()
        cohort = self._rng.sample(self.stable_order(cids), num_clients)
        if not self._known_ids_hold(cohort):  # draw again, over the answered order
            self._ask_partition_ids()
            self._rng.setstate(before)
            cohort = self._rng.sample(self.stable_order(cids), num_clients)
        return [self.clients[c] for c in cohort]


def describe_failures(failures: list, stage: str) -> list[FailureRecord]:
    """Each failure of a round with its node (None when unknown), stage and reason."""
    out = []
    for failure in failures:
        if isinstance(failure, ClientFailure):
            node, where, reason = failure.node_id, failure.stage, failure.reason
        elif isinstance(failure, tuple):  # (proxy, result) with a status other than OK
            proxy, res = failure
            status = getattr(res, "status", None)
            node, where = str(proxy.cid), stage
            reason = status.message if status is not None else repr(res)
        else:  # raised by a strategy, or by Flower outside a client call
            node, where = getattr(failure, "node_id", None), stage
            reason = f"{type(failure).__name__}: {failure}"
        out.append(FailureRecord(node_id=node, stage=where, reason=clean_reason(reason)))
    return out


# A validation split's size: more examples than this is a lie, not a count (and a sum of lies
# past 2**53 would no longer add up as floats, or overflow Flower's weighted mean).
MAX_EVAL_EXAMPLES = 2**31


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def evaluation_problem(loss, count, metrics: dict) -> str | None:
    """Why a client's evaluation cannot be averaged, or None: a loss or metric that is not a
    finite number, or an example count that is not a whole number in [0, MAX_EVAL_EXAMPLES].
    Client input, so a reason, never an exception: one NaN would make the round's average NaN
    (and results.json no longer JSON), two counts near 1e308 overflow Flower's weighted mean."""
    if not _finite_number(loss):
        return f"loss {loss!r}: not a finite number"
    if not _finite_number(count) or count != int(count) or not 0 <= count <= MAX_EVAL_EXAMPLES:
        return f"num_examples {count!r}: not a whole number of examples in [0, {MAX_EVAL_EXAMPLES}]"
    bad = next((k for k, v in metrics.items() if not _finite_number(v)), None)
    if bad is not None:
        return f"metric {bad} {metrics[bad]!r}: not a finite number"
    return None


def received_evaluations(results: list) -> tuple[list, list[tuple[str, str]]]:
    """strategy.evaluate_with_train: each train reply's evaluation of the model it received
    (its `eval/` metrics, clients/torch_client.py), as the (proxy, EvaluateRes) an evaluate
    message would have returned, plus (node, reason) for each reply whose evaluation is
    refused (:func:`evaluation_problem`). The `eval/` metrics are taken out of every train
    reply: they are no training metrics."""
    evaluations, problems = [], []
    for proxy, res in results:
        found = {k[len(RECEIVED_EVAL_PREFIX):]: v for k, v in res.metrics.items()
                 if k.startswith(RECEIVED_EVAL_PREFIX)}  # fmt: skip
        if not found:
            continue
        res.metrics = {k: v for k, v in res.metrics.items() if not k.startswith(RECEIVED_EVAL_PREFIX)}
        loss, count = found.pop("loss", None), found.pop("num_examples", None)
        why = evaluation_problem(loss, count, found)
        if why is not None:
            problems.append((str(proxy.cid), f"its train reply's evaluation has {why}"))
            continue
        evaluations.append((proxy, EvaluateRes(
            status=Status(Code.OK, ""), loss=float(loss), num_examples=int(count), metrics=found
        )))  # fmt: skip
    return evaluations, problems


class ExperimentServer(Server):
    def __init__(
        self,
        *,
        client_manager: ClientManager,
        strategy: StrategyWrapper,
        recorder: RunRecorder,
        checkpoint_fn=None,
        resume=None,
        per_site_metrics: bool = False,
        evaluate_every: int | None = 1,
        evaluate_with_train: bool = False,
    ) -> None:
        """`checkpoint_fn(round, global arrays, strategy state)`: called after every round
        (app/checkpoint.py). `resume`: a Checkpoint to continue from (its strategy state is
        loaded here; rounds continue after its round). `per_site_metrics`: record each
        federated evaluation's clients' own metrics (`federated_sites`,
        evaluation.per_site). `evaluate_every` (strategy.evaluate_every, app/server_app.py
        federated_evaluation_every): federated evaluation on every k-th round and the last,
        the others record `federated_skipped`; None: the run has no federated evaluation to
        skip (the strategy is asked every round, as with 1). `evaluate_with_train`
        (strategy.evaluate_with_train, strategies/factory.py evaluates_with_train): round r's
        train replies carry their evaluation of the model they received, recorded as round
        r-1's `federated`; only the last round sends evaluate messages."""
        super().__init__(client_manager=client_manager, strategy=strategy)
        self.per_site_metrics = per_site_metrics
        if evaluate_every is not None and evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        self.evaluate_every = evaluate_every
        self.evaluate_with_train = evaluate_with_train
        self._received: tuple[list, list] = ([], [])  # this round's received_evaluations
        self.recorder = recorder
        self.checkpoint_fn = checkpoint_fn
        self.resume = resume
        self.rounds_completed = 0
        self.rounds_aggregated = 0
        self.first_failure: str | None = None
        self.stop_reason = "not started"

    def _in_stable_order(self, results: list) -> list:
        """(proxy, res) pairs by the client manager's stable node order. Flower's thread pool
        returns them as they complete, and the strategies sum updates in list order: float
        addition is not associative, so the order must not depend on which node was faster."""
        manager = self._client_manager
        if not isinstance(manager, NodeTrackingClientManager):
            return results
        return sorted(results, key=lambda pair: manager.order_key(str(pair[0].cid)))

    def _site_metrics(self, results: list) -> dict[str, dict[str, float]]:
        """Each evaluating client's own loss, example count and metrics, by site: its
        partition id where the client manager knows it (`partition-<id>`), else its node
        (`node-<id>`, a deployed SuperNode with its own data file)."""
        manager = self._client_manager
        known = manager.partition_ids if isinstance(manager, NodeTrackingClientManager) else {}
        sites = {}
        for proxy, res in results:
            pid = known.get(str(proxy.cid))
            name = f"partition-{pid}" if pid is not None else f"node-{proxy.cid}"
            metrics = {"loss": float(res.loss), "num_examples": float(res.num_examples)}
            metrics.update(
                {k: float(v) for k, v in res.metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )  # fmt: skip
            sites[name] = metrics
        return dict(sorted(sites.items()))

    def fit_round(self, server_round: int, timeout: float | None):
        """Flower's round (flwr/server/server.py Server.fit_round) with results aggregated in
        a stable order and cohorts drawn for this round; plus the round whose Poisson cohort
        was empty: under client-level DP that round still releases (noise alone), so the
        strategy aggregates no results."""
        self._received = ([], [])  # a round that returns before its results carries none
        if isinstance(self._client_manager, NodeTrackingClientManager):
            self._client_manager.begin_round(server_round)
        instructions = self.strategy.configure_fit(
            server_round=server_round, parameters=self.parameters, client_manager=self._client_manager
        )
        if not instructions:
            if self.strategy.empty_round(server_round):
                parameters, metrics = self.strategy.aggregate_fit(server_round, [], [])
                return parameters, metrics, ([], [])
            return None
        results, failures = fit_clients(
            client_instructions=instructions, max_workers=self.max_workers, timeout=timeout,
            group_id=server_round,
        )  # fmt: skip
        results = self._in_stable_order(results)
        if self.evaluate_with_train:  # before aggregation: the eval/ metrics leave the replies
            self._received = received_evaluations(results)
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        return parameters, metrics, (results, failures)

    def evaluate_round(self, server_round: int, timeout: float | None, before_release=None):
        """Flower's federated evaluation round, its results averaged in the stable order.
        `before_release()` runs once the evaluating clients are chosen, before the model is
        sent to them."""
        instructions = self.strategy.configure_evaluate(
            server_round=server_round, parameters=self.parameters, client_manager=self._client_manager
        )
        if not instructions:
            return None
        if before_release is not None:
            before_release()
        results, failures = evaluate_clients(
            instructions, max_workers=self.max_workers, timeout=timeout, group_id=server_round
        )
        accepted, failures = [], list(failures)
        for proxy, res in self._in_stable_order(results):
            why = evaluation_problem(res.loss, res.num_examples, res.metrics)
            if why is None:
                accepted.append((proxy, res))
            else:  # refused and recorded with its node, as a failed evaluate call
                failures.append(ClientFailure(str(proxy.cid), "evaluate", f"refused evaluation: {why}"))
        loss, metrics = self.strategy.aggregate_evaluate(server_round, accepted, failures)
        return loss, metrics, (accepted, failures)

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        # Every measurement goes to results.json; the History stays empty, so Flower's
        # run_fl prints no History dump (one line per metric and round) after the run.
        history = History()
        first = 1
        if self.resume is not None:
            self.parameters = ndarrays_to_parameters(self.resume.parameters)
            self.strategy.load_state_dict(self.resume.strategy_state)
            first = self.resume.server_round + 1
            self.rounds_completed = self.resume.server_round
            self.rounds_aggregated = sum(
                1 for r in self.recorder.record.rounds if r.aggregated is not False
            )
            log(INFO, "Resuming after round %d from the checkpoint", self.resume.server_round)
        else:
            self.parameters = self._get_initial_parameters(server_round=0, timeout=timeout)
            initial = self.strategy.evaluate(0, parameters=self.parameters)
            if initial is not None:
                self.recorder.set_initial(_metrics(*initial))
                log(INFO, "initial model | central %s", _fmt(_metrics(*initial)))

        start = time.perf_counter()
        self.stop_reason = f"completed {num_rounds} rounds"
        for server_round in range(first, num_rounds + 1):
            reason = self.strategy.stop_reason()
            if reason:
                self.stop_reason = reason
                break
            round_start = time.perf_counter()
            record = RoundRecord(round=server_round)

            res_fit = self.fit_round(server_round=server_round, timeout=timeout)
            if res_fit is None:
                self.stop_reason = self.strategy.stop_reason() or (
                    f"round {server_round}: no clients could be sampled"
                )
                log(INFO, "Stopping: %s", self.stop_reason)
                break
            parameters, fit_metrics, (results, failures) = res_fit
            # Updates the strategy refused (non-finite, malformed, foreign ciphertext) failed.
            rejected = self.strategy.rejected_updates(server_round)
            restored = parameters is not None and self.strategy.rolled_back(server_round)
            if parameters is not None:
                self.parameters = parameters
                self.rounds_aggregated += 0 if restored else 1
            record.clients = ClientCounts(
                trained=len(results) - len(rejected), failed=len(failures) + len(rejected)
            )
            record.aggregated = parameters is not None and not restored
            if restored:  # the clients refused the model: an earlier one is the global model
                record.rolled_back = True
            round_failures = describe_failures(failures, "train") + [
                FailureRecord(node_id=node, stage="train", reason=clean_reason(f"rejected update: {why}"))
                for node, why in rejected
            ]
            if fit_metrics:
                record.train = dict(fit_metrics)
            evaluations, problems = self._received
            if evaluations:
                self._record_received_evaluation(server_round - 1, evaluations)
            round_failures += [
                FailureRecord(node_id=node, stage="evaluate", reason=clean_reason(f"evaluation of "
                              f"round {server_round - 1}'s model not recorded: {why}"))
                for node, why in problems
            ]  # fmt: skip

            res_cen = self.strategy.evaluate(server_round, parameters=self.parameters)
            if res_cen is not None:
                record.centralized = _metrics(*res_cen)

            # Under client-level DP the aggregate is a release the accountant has counted:
            # checkpoint the round before it goes to the evaluating clients, so that a crash
            # during evaluation resumes after this round instead of releasing it again.
            before_release = None
            if self.checkpoint_fn is not None and self.strategy.accounts_releases():
                def before_release(record=record, server_round=server_round, round_start=round_start):
                    pending = copy.deepcopy(record)
                    self.strategy.contribute(server_round, pending)
                    pending.seconds = time.perf_counter() - round_start
                    self._checkpoint(server_round, pending)

            res_fed = None
            if self.federated_evaluation_due(server_round, num_rounds):
                res_fed = self.evaluate_round(server_round=server_round, timeout=timeout, before_release=before_release)
            elif not self.evaluate_with_train:  # strategy.evaluate_every: no evaluate messages this round
                record.federated_skipped = True
            if res_fed is not None and res_fed[0] is not None:
                record.federated = _federated(res_fed[0], res_fed[1], server_round)
            if res_fed is not None:
                round_failures += describe_failures(res_fed[2][1], "evaluate")
                if self.per_site_metrics and res_fed[2][0]:
                    record.federated_sites = self._site_metrics(res_fed[2][0])
            if round_failures:  # omitted when none, like every part not measured
                record.clients.failures = round_failures
                if self.first_failure is None:
                    f = round_failures[0]
                    self.first_failure = f"node {f.node_id} ({f.stage}): {f.reason}"
                for f in round_failures:
                    log(WARNING, "round %d: node %s failed (%s): %s",
                        server_round, f.node_id, f.stage, f.reason)  # fmt: skip

            self.strategy.contribute(server_round, record)
            record.seconds = time.perf_counter() - round_start
            self.recorder.add_round(record)
            self.rounds_completed = server_round
            if self.checkpoint_fn is not None:
                self._checkpoint(server_round)
            log(INFO, _round_line(record, num_rounds, time.perf_counter() - start))
        return history, time.perf_counter() - start

    def _checkpoint(self, server_round: int, pending: RoundRecord | None = None) -> None:
        """checkpoint_fn of this round; `pending`: the round's record so far, for a checkpoint
        written before the round ends (its results then include it)."""
        arrays = list(self.strategy.global_model.arrays(self.parameters))
        if pending is None:
            self.checkpoint_fn(server_round, arrays, self.strategy.state_dict())
        else:
            self.checkpoint_fn(server_round, arrays, self.strategy.state_dict(), pending=pending)

    def _record_received_evaluation(self, evaluated_round: int, evaluations: list) -> None:
        """Round `evaluated_round`'s federated evaluation, from the next round's train replies
        (strategy.evaluate_with_train), averaged by the strategy as an evaluate stage's."""
        earlier = next((r for r in self.recorder.record.rounds if r.round == evaluated_round), None)
        if earlier is None or earlier.federated is not None:
            # not recorded, or evaluated by its own evaluate messages already: the last round
            # of a run that a resume with more rounds continues keeps that measurement
            return
        evaluations = self._in_stable_order(evaluations)
        loss, metrics = self.strategy.aggregate_evaluate(evaluated_round, evaluations, [])
        if loss is None:
            return
        federated = _federated(loss, metrics, evaluated_round)
        if federated is None:
            return
        parts: dict[str, Any] = {"federated": federated}
        if self.per_site_metrics:
            parts["federated_sites"] = self._site_metrics(evaluations)
        self.recorder.update_round(evaluated_round, **parts)
        log(INFO, "round %d: federated %s (measured by %d clients as round %d began)",
            evaluated_round, _fmt(parts["federated"]), len(evaluations), evaluated_round + 1)  # fmt: skip

    def federated_evaluation_due(self, server_round: int, num_rounds: int) -> bool:
        """Whether `server_round` sends evaluate messages: every `evaluate_every`-th round
        and the last one (`num_rounds`); with `evaluate_with_train` the last one only (the
        others are evaluated by the next round's train messages)."""
        if self.evaluate_with_train:
            return server_round == num_rounds
        k = self.evaluate_every
        return k is None or server_round % k == 0 or server_round == num_rounds

    def check_trained(self) -> None:
        """Raise RunFailed when no round aggregated any update (every client failed or was
        rejected, or no round could run): the model is still the initial one."""
        if self.rounds_aggregated > 0:
            return
        cause = self.first_failure.splitlines()[-1] if self.first_failure else self.stop_reason
        raise RunFailed(
            f"no client update was aggregated in any of {self.rounds_completed} rounds "
            f"({self.stop_reason}), so there is no trained model; first failure: {cause}"
        )


def _federated(loss: float, metrics: dict[str, Any], server_round: int) -> dict[str, float] | None:
    """A round's federated metrics, or None (logged) when their average is not finite: every
    client's values are (evaluation_problem), but a large enough loss times its example
    count still overflows to inf, which results.json cannot hold as JSON."""
    federated = _metrics(loss, metrics)
    if all(math.isfinite(v) for v in federated.values()):
        return federated
    log(WARNING, "round %d: federated evaluation averaged to %s, not a finite number; not recorded",
        server_round, _fmt(federated))  # fmt: skip
    return None


def _metrics(loss: float, metrics: dict[str, Any]) -> dict[str, float]:
    out = {"loss": float(loss)}
    out.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


# The console line's metrics (results.json has them all: per-class recall, ECE, ...), in order.
CONSOLE_METRICS = ("loss", "accuracy", "auroc", "sensitivity", "specificity", "f1", "mae", "rmse", "r2")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {metrics[k]:.4f}" for k in CONSOLE_METRICS if k in metrics)


def _round_line(record: RoundRecord, num_rounds: int, total: float) -> str:
    parts = [f"round {record.round}/{num_rounds}"]
    if record.centralized is not None:
        parts.append(f"central {_fmt(record.centralized)}")
    if record.federated is not None:
        parts.append(f"federated {_fmt(record.federated)}")
    elif record.federated_skipped:
        parts.append("federated skipped (strategy.evaluate_every)")
    if record.privacy is not None:
        parts.append(f"epsilon {record.privacy.epsilon:.3f} (delta {record.privacy.delta:g})")
    if record.train is not None and "train_loss" in record.train:
        parts.append(f"train loss {record.train['train_loss']:.4f}")
    if record.clients is not None:
        parts.append(f"clients {record.clients.trained} ok {record.clients.failed} failed")
    if record.rolled_back:
        parts.append("clients refused the model: rolled back to the last accepted one")
    elif record.aggregated is False:
        parts.append("no update aggregated: model unchanged")
    if record.comm is not None:
        parts.append(f"{(record.comm.bytes_down + record.comm.bytes_up) / 1024:.0f} KiB")
    parts.append(f"{record.seconds:.1f} s (total {total:.2f} s)")
    return " | ".join(parts)
