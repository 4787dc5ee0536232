"""Test tiers: every test is exactly one of `unit`, `integration` or `e2e` (README "Tests").

- unit: in this process only: no child process, no process group, no network socket; the
  whole tier runs in under two minutes (`pytest -m unit`).
- integration: real processes and process groups on this machine (DDP gloo groups, the
  CLIs run as programs, headless Chromium), the full-size privacy audit and the full-size
  fuzz of HE payloads (tests/test_he_hostile.py).
- e2e: `flwr run`, a deployed SuperLink with SuperNodes, the notebooks.

A test with no tier marker is a unit test (the marker is added at collection). The
`slow` marker is added to every integration and e2e test, so `pytest -m "not slow"` still
selects exactly the unit tier; a test marked `slow` must also name its tier.

`UnitGuard` enforces the unit tier while a unit test runs (its setup, call and teardown):
starting a process (subprocess, multiprocessing in any start method, os.fork / posix_spawn /
system), an IPv4/IPv6 socket that binds, listens or connects, a torch.distributed process
group or a gRPC server raises `UnitTierViolation` at the call, and the test fails with what it
tried, also when the code under test caught the exception. A module's code that runs while it
is first imported is let through (ray probes for AMD GPUs with `cat | grep`, urllib3 binds an
IPv6 socket): the first import happens in whichever test of a worker needs it first, so
refusing it would fail tests by the order they run in. Code that starts processes from C
without going through these functions (none in this project) is not seen.

The hooks at the end are this plugin; tests/conftest.py imports them (`-p tests.support.tiers`
loads them into another pytest session).
"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")

_TIER = pytest.StashKey[str]()


def tier_of(item: pytest.Item) -> str:
    return item.stash.get(_TIER, "unit")


def assign_tiers(items: list[pytest.Item]) -> None:
    """Give every collected test its tier marker (unit by default) and `slow` outside the unit
    tier; raise pytest.UsageError listing every test whose markers contradict each other."""
    errors = []
    for item in items:
        marked = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(marked) > 1:
            errors.append(f"{item.nodeid}: marked {' and '.join(marked)}; a test has one tier")
            continue
        tier = marked[0] if marked else "unit"
        if not marked:
            item.add_marker("unit")
        if tier == "unit" and item.get_closest_marker("slow") is not None:
            errors.append(f"{item.nodeid}: marked slow but its tier is unit; mark it integration "
                          "(processes, process groups) or e2e (flwr run, deployment, notebooks)")  # fmt: skip
            continue
        if tier != "unit" and item.get_closest_marker("slow") is None:
            item.add_marker("slow")
        item.stash[_TIER] = tier
    if errors:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(errors))


SOCKET_CALLS = {  # the socket.socket methods a unit test may not call on an IPv4/IPv6 socket
    "bind": "bind a network socket to",
    "listen": "listen on a network socket at",
    "connect": "connect a network socket to",
    "connect_ex": "connect a network socket to",
}


def importing() -> bool:
    """Whether this call comes from a module's code running at its first import."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def where_from(depth: int = 4) -> str:
    """The calling thread and its innermost `depth` frames outside this module, one line."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__][-depth:]
    calls = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"thread {threading.current_thread().name}: {calls}"


class UnitTierViolation(RuntimeError):
    """A unit test tried to start a process, open a network socket or a process group."""


class UnitGuard:
    """While active, the ways out of this process raise UnitTierViolation and are recorded."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.violations: list[str] = []
        self.origins: list[str] = []
        self._undo: list[tuple[object, str, object, bool]] = []

    def _refuse(self, what: str) -> UnitTierViolation:
        self.violations.append(what)
        # Where it came from (thread and the innermost calls outside this module), so that a
        # violation from a background thread an earlier test or a library started is told apart
        self.origins.append(where_from())
        return UnitTierViolation(
            f"{self.nodeid} is a unit test and tried to {what}: unit tests run in this process "
            "only; mark it integration (processes, process groups) or e2e (flwr run, "
            "deployment, notebooks)"
        )

    def _patch(self, owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        # socket.socket inherits bind/connect from _socket.socket: undo deletes the override
        self._undo.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, make(original))

    def _refusing(self, what: str) -> Callable[[Callable], Callable]:
        def make(original):
            def refuse(*args, **kwargs):
                if importing():
                    return original(*args, **kwargs)
                raise self._refuse(what)

            return refuse

        return make

    def __enter__(self) -> UnitGuard:
        self._patch(subprocess.Popen, "_execute_child", self._refusing("start a process"))
        # multiprocessing's spawn and forkserver starts (and its resource tracker)
        self._patch(_posixsubprocess, "fork_exec", self._refusing("start a process"))
        for name in ("fork", "forkpty"):  # multiprocessing's fork start, os.spawn*
            self._patch(os, name, self._refusing(f"start a process (os.{name})"))
        for name in ("posix_spawn", "posix_spawnp", "system"):
            self._patch(os, name, self._refusing(f"start a process (os.{name})"))

        def inet_only(verb: str):
            def make(original):
                def checked(sock, *args):
                    if sock.family in (socket.AF_INET, socket.AF_INET6) and not importing():
                        where = sock.getsockname() if verb == "listen" else args[0]
                        raise self._refuse(f"{SOCKET_CALLS[verb]} {where!r}")
                    return original(sock, *args)

                return checked

            return make

        for verb in SOCKET_CALLS:
            self._patch(socket.socket, verb, inet_only(verb))
        if "torch.distributed" in sys.modules:
            self._patch(sys.modules["torch.distributed"], "init_process_group",
                        self._refusing("start a torch.distributed process group"))  # fmt: skip
        if "grpc" in sys.modules:
            self._patch(sys.modules["grpc"], "server", self._refusing("start a gRPC server"))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            owner, name, original, own = self._undo.pop()
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        if self.violations:
            pytest.fail(
                "unit tier: this test tried to " + "; and to ".join(self.violations)
                + ". Unit tests run in this process only: mark it integration (processes, "
                "process groups) or e2e (flwr run, deployment, notebooks). From: "
                + "; ".join(self.origins),
                pytrace=False,
            )  # fmt: skip


# ------------------------------------------------------------------------------ hooks
@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers it adds
def pytest_collection_modifyitems(config, items):
    assign_tiers(items)
    # Longest first: xdist hands tests (and xdist_group blocks) out in collection order, so
    # the e2e tests (30-200 s each) start at once and the unit tests (most under 1 s) fill
    # the workers at the end, instead of a notebook, collected late, starting last and
    # running alone. Stable: a module's tests keep their order within each tier.
    items.sort(key=lambda item: -TIERS.index(tier_of(item)))


def _guarded(item):
    if tier_of(item) != "unit":
        return (yield)
    with UnitGuard(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded(item))
