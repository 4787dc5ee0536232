"""The processes a local Flower setup starts, found and stopped by PID.

`flwr run` leaves a detached SuperLink (and Ray, SuperExec, simulation processes) running;
tests and benchmarks give each setup its own FLWR_HOME and ports, then stop every process
whose environment carries that FLWR_HOME (inherited by every descendant). Flower has no
command that stops the local SuperLink it started, so this is written here.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Flower's SuperExec (the one a SuperNode or the local SuperLink starts) asks for a new task
# every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (flwr/supercore/superexec/run_superexec.py,
# default 1.0, at least 0.01): every ClientApp process of a deployment waits for that tick.
# 0.1 s, as README "Deploy across machines" starts SuperNodes (benchmarks/deployment_round.py).
SUPEREXEC_TASK_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def isolated_flower_env(home: Path | str) -> dict[str, str]:
    """Environment variables for a Flower setup of its own: home, ports, no runtime
    dependency installation, no update check, the SuperExec's task poll at 0.1 s
    (SUPEREXEC_TASK_POLL); MLflow tracking off unless a run sets tracking.enabled=true (it
    adds seconds of CPU to every run a benchmark times), and then into the home's own store."""
    return {
        **SUPEREXEC_TASK_POLL,
        "FLWR_HOME": str(home),
        "PRIVACY_FT_TRACKING": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{Path(home).resolve() / 'mlflow.db'}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment has key=value (inherited by every descendant, Ray included)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            pids.append(int(entry.name))
    return pids


def stop_processes(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace` seconds; reap our own children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            for pid in pids:  # reap our own children so they do not linger as zombies
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.1)


def stop_flower(home: Path | str) -> None:
    """Stop every process started with FLWR_HOME=home."""
    stop_processes(processes_with_env("FLWR_HOME", str(home)))
