"""The deployment round path's message collector (app/grid_messages.py), and
strategy.evaluate_every in the real round loop.

The collector is tested against `FakeGrid`, an in-memory stand-in for the SuperLink's Runtime
API (push_messages / pull_messages, replies sent by "nodes" on timer threads): the real
HttpGrid needs a SuperLink, and that path is tests/test_deploy.py's (e2e)."""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common import ConfigRecord, GetPropertiesIns
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.supercore.run import Run, RunNotRunningException
from flwr.supercore.task_identity import TaskIdentity

from app.config import load_config
from app.grid_messages import CollectingGrid, CollectorClosed, MessageCollector
from core.config import ConfigError
from tests.support.rounds import in_process_run


class FakeGrid:
    """push_messages / pull_messages in memory: a reply is pulled once, then gone (as the
    SuperLink deletes a pulled reply). `reply_after(s)` makes a node answer each pushed
    message `s` seconds later; `pull_error` makes every pull raise it."""

    def __init__(self, reply_after: float | None = 0.05) -> None:
        self.reply_after = reply_after
        self.lock = threading.Lock()
        self.replies: dict[str, Message] = {}
        self.pushed: list[Message] = []
        self.pull_calls: list[list[str]] = []
        self.pull_error: BaseException | None = None
        self.timers: list[threading.Timer] = []
        self.errors_for: set[int] = set()  # dst node ids that answer with an error
        self._run = Run.create_empty(run_id=7)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            self.pushed.append(msg)
            if self.reply_after is not None:
                timer = threading.Timer(self.reply_after, self.answer, args=(msg,))
                self.timers.append(timer)
                timer.start()
        return ids

    def answer(self, msg: Message) -> None:
        if msg.metadata.dst_node_id in self.errors_for:
            reply = Message(Error(code=0, reason="the ClientApp crashed"), reply_to=msg)
        else:
            echo = RecordDict({"echo": ConfigRecord({"node": msg.metadata.dst_node_id})})
            reply = Message(echo, reply_to=msg)
        with self.lock:
            self.replies[msg.metadata.message_id] = reply

    def pull_messages(self, message_ids):
        ids = list(message_ids)
        self.pull_calls.append(ids)
        if self.pull_error is not None:
            raise self.pull_error
        with self.lock:
            return [self.replies.pop(i) for i in ids if i in self.replies]

    # what CollectingGrid delegates
    @property
    def run(self):
        return self._run

    def get_node_ids(self):
        return [1, 2, 3]

    def cancel(self):
        for timer in self.timers:
            timer.cancel()


def message(node: int) -> Message:
    return Message(RecordDict({"q": ConfigRecord({"node": node})}), dst_node_id=node, message_type="query")


def node_of(reply: Message) -> int:
    return reply.content["echo"]["node"]


@pytest.fixture(autouse=True)
def server_identity():
    """What start_grid sets in a ServerApp process before any Message is made (flwr/server/
    compat/app.py), put back afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def grid():
    fake = FakeGrid()
    yield fake
    fake.cancel()


@pytest.fixture
def collector(grid):
    c = MessageCollector(grid)
    yield c
    c.close()


def test_a_reply_is_returned_within_half_a_second(grid, collector):
    started = time.monotonic()
    replies = collector.send_and_receive([message(1)])
    elapsed = time.monotonic() - started
    assert [node_of(r) for r in replies] == [1]
    assert elapsed < 0.5, f"{elapsed:.2f} s for a reply that came after 0.05 s"


def test_concurrent_threads_each_get_their_own_reply_from_one_poller(grid, collector):
    grid.reply_after = 0.3  # every thread's message is pending at once
    got: dict[int, list[int]] = {}

    def call(node: int) -> None:
        got[node] = [node_of(r) for r in collector.send_and_receive([message(node)])]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(1, 9)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert got == {n: [n] for n in range(1, 9)}
    assert time.monotonic() - started < 1.0
    # one poller pulled for all of them: some pull asked for several threads' ids at once
    assert max(len(ids) for ids in grid.pull_calls) > 1


def test_several_messages_of_one_call_come_back_in_the_order_sent(grid, collector):
    replies = collector.send_and_receive([message(3), message(1), message(2)])
    assert [node_of(r) for r in replies] == [3, 1, 2]


def test_a_timeout_returns_the_replies_that_arrived(grid, collector):
    grid.reply_after = None  # nodes answer by hand below
    fast, slow = message(1), message(2)
    threading.Timer(0.05, lambda: grid.answer(fast)).start()
    started = time.monotonic()
    replies = collector.send_and_receive([fast, slow], timeout=0.6)
    elapsed = time.monotonic() - started
    assert [node_of(r) for r in replies] == [1]
    assert 0.55 <= elapsed < 1.2
    # the slow one is no longer pulled for: nobody waits for it
    time.sleep(0.3)
    pulls = len(grid.pull_calls)
    time.sleep(0.3)
    assert len(grid.pull_calls) == pulls


def test_without_timeout_it_waits_for_every_reply(grid, collector):
    grid.reply_after = None
    late = message(1)
    threading.Timer(1.2, lambda: grid.answer(late)).start()
    replies = collector.send_and_receive([late])  # timeout None: past any default
    assert [node_of(r) for r in replies] == [1]


def test_an_error_reply_passes_through_to_the_client_proxy(grid):
    grid.errors_for = {2}
    wrapped = CollectingGrid(grid)
    try:
        replies = wrapped.send_and_receive([message(2)])
        assert len(replies) == 1 and replies[0].has_error()
        assert replies[0].error.reason == "the ClientApp crashed"
        # as the legacy round loop sees it: Flower's GridClientProxy raises the node's error
        proxy = GridClientProxy(node_id=2, grid=wrapped, run_id=7)
        with pytest.raises(ValueError, match="the ClientApp crashed"):
            proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=1)
    finally:
        wrapped.close()


def test_a_failing_pull_is_retried_then_its_error_reaches_the_waiter(grid):
    collector = MessageCollector(grid, max_pull_failures=3)
    grid.pull_error = ConnectionError("SuperLink unreachable: port 9093")
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="port 9093"):
            collector.send_and_receive([message(1)])  # timeout None: must not hang
        assert len(grid.pull_calls) == 3
        assert time.monotonic() - started < 2.0
    finally:
        collector.close()


def test_a_pull_that_fails_once_is_retried_and_the_reply_still_arrives(grid, collector):
    grid.pull_error = ConnectionError("a blip")
    threading.Timer(0.15, lambda: setattr(grid, "pull_error", None)).start()
    replies = collector.send_and_receive([message(1)])
    assert [node_of(r) for r in replies] == [1]


def test_a_stopped_run_fails_the_waiters_at_once(grid):
    collector = MessageCollector(grid, max_pull_failures=100)
    grid.pull_error = RunNotRunningException()
    try:
        with pytest.raises(RunNotRunningException):
            collector.send_and_receive([message(1)])
        assert len(grid.pull_calls) == 1
    finally:
        collector.close()


def test_close_stops_the_poller_and_wakes_a_waiter(grid):
    grid.reply_after = None  # no reply ever
    collector = MessageCollector(grid)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            collector.send_and_receive([message(1)])
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert collector.polling
    before = {t.name for t in threading.enumerate()}
    assert "grid-message-collector" in before
    collector.close()
    waiter.join(2)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CollectorClosed)
    assert not collector.polling
    assert "grid-message-collector" not in {t.name for t in threading.enumerate()}
    with pytest.raises(CollectorClosed):
        collector.send_and_receive([message(2)])


def test_the_wrapper_delegates_everything_but_send_and_receive(grid):
    wrapped = CollectingGrid(grid)
    try:
        assert wrapped.run.run_id == 7
        assert list(wrapped.get_node_ids()) == [1, 2, 3]
        assert wrapped.reply_after == grid.reply_after  # any other attribute: the real grid's
        assert not wrapped.collector.polling  # the poller starts with the first message
    finally:
        wrapped.close()


# --------------------------------------------------------------------------- evaluate_every
def test_evaluate_every_2_runs_federated_evaluation_on_rounds_2_and_4_of_4(tmp_path):
    run = in_process_run(
        "num_rounds=4 strategy.evaluate_every=2 strategy.fraction_evaluate=1.0", tmp_path
    ).fit()
    rounds = run.recorder.record.rounds
    assert [r.federated is not None for r in rounds] == [False, True, False, True]
    assert [r.federated_skipped for r in rounds] == [True, None, True, None]
    assert all(r.centralized is not None for r in rounds)  # centralized: every round


def test_evaluate_every_runs_federated_evaluation_on_the_last_round(tmp_path):
    run = in_process_run(
        "num_rounds=3 strategy.evaluate_every=2 strategy.fraction_evaluate=1.0", tmp_path
    ).fit()
    rounds = run.recorder.record.rounds
    assert [r.federated is not None for r in rounds] == [False, True, True]  # 3 is the last
    written = (tmp_path / "results.json").read_text()
    assert written.count('"federated_skipped": true') == 1
    run.finish()
    assert run.recorder.record.final.federated is not None


def test_evaluate_every_records_no_skip_when_the_run_has_no_federated_evaluation(tmp_path):
    run = in_process_run("num_rounds=2 strategy.evaluate_every=2 strategy.fraction_evaluate=0", tmp_path).fit()
    assert [r.federated_skipped for r in run.recorder.record.rounds] == [None, None]


def test_evaluate_every_below_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"strategy\.evaluate_every=0: must be at least 1"):
        load_config("strategy.evaluate_every=0")


def test_the_shipped_grid_switch_reads_the_run_config():
    from flwr.common import Context

    from app.server_app import shipped_grid

    def context(**run_config):
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    assert shipped_grid(context()) is False  # absent: the collector
    assert shipped_grid(context(**{"shipped-grid": False})) is False
    assert shipped_grid(context(**{"shipped-grid": True})) is True
    assert shipped_grid(context(**{"shipped-grid": "true"})) is True
    with pytest.raises(ConfigError, match=r"run config shipped-grid='yes': use true or false"):
        shipped_grid(context(**{"shipped-grid": "yes"}))
