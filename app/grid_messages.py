"""A deployment Grid whose `send_and_receive` notices replies within a tenth of a second.

Why this is written here: Flower 1.41's legacy round loop (the `Server` that
app/experiment_server.py runs through `flwr.server.compat.start_grid`) sends every client call
on its own: `flwr/server/compat/grid_client_proxy.py:121` (`GridClientProxy.
_send_receive_recorddict`) calls `grid.send_and_receive(messages=[message])` with one message,
from one of the threads of `fit_clients` / `evaluate_clients` (flwr/server/server.py). In
deployment the grid is `flwr/superlink/grid/http_grid.py` `HttpGrid`, whose `send_and_receive`
(lines 384-413) pushes, pulls, and between pulls sleeps a hard-coded `time.sleep(3)`
(line 412), with no parameter or environment variable to change it. Every reply is therefore
seen up to 3 s after it reached the SuperLink, once per message, and a round sends two
messages to each sampled node one after the other (train, then evaluate). The simulation's
`flwr/superlink/grid/inmemory_grid.py` `InMemoryGrid` sleeps `pull_interval` (default 0.1 s,
lines 49 and 177) instead, so it is left as it is.

:class:`CollectingGrid` wraps the real grid and delegates everything to it except
`send_and_receive`, which goes through one :class:`MessageCollector` per run: the calling
thread pushes its messages at once (`grid.push_messages`), and a single poller thread pulls
every pending message id together every `interval` seconds (`grid.pull_messages`) and hands
each reply (keyed by `reply_to_message_id`) to the thread waiting for it. Flower's semantics
are kept: `timeout=None` waits until every reply arrived; a timeout returns the replies that
arrived by then. A reply carrying an error is returned like any reply (GridClientProxy turns
it into the client's failure). A failed pull is retried on the next tick; after
`max_pull_failures` consecutive failures, or at once when the run stops
(`flwr.supercore.run.RunNotRunningException`, a BaseException), the error is raised in every
waiting thread instead of leaving it waiting. :meth:`CollectingGrid.close` stops the poller
(app/server_app.py closes it when the rounds end, also when they fail); a waiter still
waiting then gets :class:`CollectorClosed`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from logging import DEBUG, WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.supercore.run import RunNotRunningException

PULL_INTERVAL_S = 0.1  # the poller's tick (HttpGrid: 3 s)
MAX_PULL_FAILURES = 3  # consecutive failed pulls before the error reaches the waiters


class CollectorClosed(RuntimeError):
    """The collector stopped while a thread still waited for replies."""


class _Batch:
    """One `send_and_receive` call: the ids it waits for and the replies that came."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.replies: dict[str, Message] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def add(self, message_id: str, reply: Message) -> None:
        self.replies[message_id] = reply
        if len(self.replies) == len(self.ids):
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class MessageCollector:
    """Pushes from the calling threads, pulls for all of them from one poller thread."""

    def __init__(
        self, grid: Grid, interval: float = PULL_INTERVAL_S, max_pull_failures: int = MAX_PULL_FAILURES
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.grid = grid
        self.interval = interval
        self.max_pull_failures = max_pull_failures
        self._lock = threading.Lock()
        self._pending: dict[str, _Batch] = {}  # message id -> the call waiting for its reply
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.pulls = 0  # pull_messages calls made (for tests and diagnostics)

    # ------------------------------------------------------------------ callers' side
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push `messages` now; return their replies (in the order the messages were given)
        once all arrived, or, with a `timeout` in seconds, those that arrived by then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pushed = list(self.grid.push_messages(list(messages)))
        ids = [i for i in pushed if i]  # Flower returns None for a message it could not push
        if len(ids) < len(pushed):
            log(WARNING, "%d of %d messages were not pushed to the SuperLink; no reply will come for them",
                len(pushed) - len(ids), len(pushed))  # fmt: skip
        if not ids:
            return []
        batch = _Batch(ids)
        with self._lock:
            if self._closed:
                raise CollectorClosed("the message collector is closed: no replies can be received")
            for message_id in ids:
                self._pending[message_id] = batch
            self._start_poller()
        try:
            batch.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                for message_id in ids:
                    if self._pending.get(message_id) is batch:
                        del self._pending[message_id]
        if batch.error is not None:
            raise batch.error
        return [batch.replies[i] for i in ids if i in batch.replies]

    def close(self) -> None:
        """Stop the poller and wake every waiting thread with CollectorClosed."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join()
        self._fail_all(CollectorClosed("the message collector was closed before the replies arrived"))

    @property
    def polling(self) -> bool:
        """True while the poller thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ poller side
    def _start_poller(self) -> None:  # with self._lock held
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._poll, name="grid-message-collector", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._pending)
            if not ids:
                continue
            try:
                self.pulls += 1
                replies = list(self.grid.pull_messages(ids))
            except RunNotRunningException as err:  # the run stopped: nothing more will come
                self._fail_all(err)
                continue
            except Exception as err:  # noqa: BLE001 - any transport error: retry, then propagate
                failures += 1
                log(WARNING, "pulling %d replies from the SuperLink failed (%d of %d tries): %s",
                    len(ids), failures, self.max_pull_failures, err)  # fmt: skip
                if failures >= self.max_pull_failures:
                    self._fail_all(err)
                    failures = 0
                continue
            failures = 0
            self._deliver(replies)

    def _deliver(self, replies: list[Message]) -> None:
        with self._lock:
            for reply in replies:
                message_id = reply.metadata.reply_to_message_id
                batch = self._pending.pop(message_id, None)
                if batch is None:  # its caller timed out, or a message nobody here sent
                    log(DEBUG, "dropped a reply to message %s: no call waits for it", message_id)
                    continue
                batch.add(message_id, reply)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            batches = {id(b): b for b in self._pending.values()}.values()
            self._pending.clear()
        for batch in batches:
            batch.fail(error)


class CollectingGrid(Grid):
    """The run's Grid, with `send_and_receive` through a :class:`MessageCollector`; every
    other method and attribute is the wrapped grid's."""

    def __init__(
        self, grid: Grid, interval: float = PULL_INTERVAL_S, max_pull_failures: int = MAX_PULL_FAILURES
    ) -> None:
        self.grid = grid
        self.collector = MessageCollector(grid, interval, max_pull_failures)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.collector.send_and_receive(messages, timeout=timeout)

    def close(self) -> None:
        """Stop the collector's poller (the wrapped grid stays open: Flower closes it)."""
        self.collector.close()

    def __getattr__(self, name: str) -> Any:  # anything else the real grid has
        return getattr(self.__dict__["grid"], name)
