"""The test tiers (tests/support/tiers.py) hold: an unmarked test is a unit test, `-m "not slow"`
selects exactly the unit tier, contradicting markers stop the session, and a unit test that
starts a process or opens a network socket fails, also when the code under test catches the
refusal. The sessions here are pytest sessions of their own, run in this process."""

import _posixsubprocess
import multiprocessing
import os
import socket
import subprocess

import pytest
import torch.distributed as dist

from tests.support.tiers import UnitGuard, UnitTierViolation

pytestmark = pytest.mark.unit

MARKERS = "[pytest]\nmarkers =\n    unit\n    integration\n    e2e\n    slow\n"


def noop():
    pass


def test_unit_guard_refuses_every_way_out_of_the_process_and_fails_even_when_caught():
    ways_out = {
        "start a process": lambda: subprocess.run(["true"]),
        "start a process (os.fork)": lambda: multiprocessing.get_context("fork").Process(target=noop).start(),
        "start a process (os.system)": lambda: os.system("true"),
        "start a process (os.posix_spawn)": lambda: os.posix_spawn("/bin/true", ["true"], {}),
        "bind a network socket to ('::1', 0)": lambda: socket.socket(socket.AF_INET6).bind(("::1", 0)),
        "listen on a network socket at ('0.0.0.0', 0)": lambda: socket.socket().listen(),
        "connect a network socket to ('127.0.0.1', 9)": lambda: socket.socket().connect(("127.0.0.1", 9)),
        "start a torch.distributed process group": lambda: dist.init_process_group(
            "gloo", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1
        ),
    }
    before = (subprocess.Popen._execute_child, _posixsubprocess.fork_exec, os.fork, socket.socket.bind,
              dist.init_process_group)  # fmt: skip
    with pytest.raises(pytest.fail.Exception) as failed:
        with UnitGuard("tests/x.py::t"):
            for what, leave in ways_out.items():
                with pytest.raises(UnitTierViolation) as refused:
                    leave()
                assert f"tests/x.py::t is a unit test and tried to {what}:" in str(refused.value)
            with pytest.raises(UnitTierViolation):  # multiprocessing's default start on Linux
                multiprocessing.get_context("spawn").Process(target=noop).start()
            a, b = socket.socketpair()  # a local pipe, not the network: allowed
            a.sendall(b"x")
            assert b.recv(1) == b"x"
            a.close(), b.close()
            try:  # code under test that swallows the refusal does not hide it
                subprocess.run(["true"])
            except Exception:
                pass
    message = str(failed.value)
    assert message.startswith("unit tier: this test tried to start a process; and to start a process (os.fork)")
    assert message.count("; and to ") == len(ways_out) + 1  # every refusal, the swallowed one too
    assert "mark it integration (processes, process groups) or e2e" in message
    after = (subprocess.Popen._execute_child, _posixsubprocess.fork_exec, os.fork, socket.socket.bind,
             dist.init_process_group)  # fmt: skip
    assert after == before  # everything put back


@pytest.fixture
def run_session(pytester, monkeypatch):
    """Run pytest in this process on one test file, with only the tier plugin."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # xdist, hypothesis...: not needed
    pytester.makeini(MARKERS)

    def run(source, *args):
        pytester.makepyfile(test_inner=source)
        return pytester.runpytest_inprocess(
            "-p", "tests.support.tiers", "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestAssertRewriteWarning", *args,  # the plugin is imported already
        )  # fmt: skip

    return run


TIERED = """
import pytest

def test_plain():
    pass

@pytest.mark.integration
def test_group():
    pass

@pytest.mark.e2e
def test_flwr_run():
    pass
"""


@pytest.mark.parametrize(
    "select, selected",
    [
        ("unit", ["test_plain"]),
        ("not slow", ["test_plain"]),
        ("slow", ["test_flwr_run", "test_group"]),  # longest tier first
        ("integration", ["test_group"]),
        ("e2e", ["test_flwr_run"]),
    ],
)
def test_an_unmarked_test_is_unit_and_not_slow_selects_the_unit_tier(run_session, select, selected):
    result = run_session(TIERED, "--collect-only", "-q", "-m", select)
    assert result.ret == pytest.ExitCode.OK
    assert [line.split("::")[1] for line in result.outlines if "::" in line] == selected


def test_the_longest_tier_is_collected_first_so_workers_end_on_short_tests(run_session):
    result = run_session(TIERED + TIERED.replace("def test_", "def test_again_"), "--collect-only", "-q")
    assert [line.split("::")[1] for line in result.outlines if "::" in line] == [
        "test_flwr_run", "test_again_flwr_run", "test_group", "test_again_group",
        "test_plain", "test_again_plain",
    ]  # fmt: skip


def test_contradicting_tiers_stop_the_session_and_name_each_test(run_session):
    source = """
import pytest

@pytest.mark.slow
def test_only_slow():
    pass

@pytest.mark.unit
@pytest.mark.e2e
def test_two_tiers():
    pass
"""
    result = run_session(source, "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = "\n".join(result.errlines)
    assert "test_inner.py::test_only_slow: marked slow but its tier is unit" in errors
    assert "test_inner.py::test_two_tiers: marked e2e and unit; a test has one tier" in errors


def test_a_unit_test_that_leaves_the_process_fails_in_setup_or_call(run_session):
    source = """
import socket
import subprocess

import pytest

BIND = socket.socket.bind  # what bind is outside any guard of this session

@pytest.fixture
def server_socket():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s

def test_in_process():
    assert sum(range(4)) == 6

def test_swallows_the_refusal():
    try:
        subprocess.run(["true"])
    except Exception:
        pass

def test_fixture_binds_a_port(server_socket):
    pass

@pytest.mark.integration
def test_integration_is_not_guarded():
    assert socket.socket.bind is BIND
"""
    result = run_session(source, "-q")
    result.assert_outcomes(passed=2, failed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_fixture_binds_a_port*",
        "unit tier: this test tried to bind a network socket to ('127.0.0.1', 0). Unit tests run in this process only*",
        "*_ test_swallows_the_refusal _*",
        "unit tier: this test tried to start a process. Unit tests run in this process only*"
        "From: thread MainThread: subprocess.py:* __init__ < subprocess.py:* run < test_inner.py:20 test_swallows_the_refusal <*",
    ])  # fmt: skip


def test_what_a_module_does_while_it_is_first_imported_is_let_through(tmp_path, monkeypatch):
    """ray starts `cat | grep` when first imported: whichever test imports it first must not
    fail for it. The same call from the module's function afterwards is refused."""
    (tmp_path / "probing_module.py").write_text(
        "import socket, subprocess\n"
        "FOUND = subprocess.run(['true']).returncode == 0\n"
        "socket.socket(socket.AF_INET6).bind(('::1', 0))\n"
        "def probe():\n"
        "    return subprocess.run(['true'])\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(pytest.fail.Exception, match="^unit tier: this test tried to start a process. Unit"):
        with UnitGuard("tests/x.py::t"):
            import probing_module

            assert probing_module.FOUND
            with pytest.raises(UnitTierViolation):
                probing_module.probe()
