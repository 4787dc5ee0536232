"""Shared fixtures. End-to-end tests get their own FLWR_HOME and ports, and every process they
start (SuperLink, SuperExec, simulation, Ray) is stopped by PID afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class FlowerEnv:
    """An isolated Flower home: `run()` calls `flwr run` with it; `stop()` ends everything."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
        )

    def run(self, overrides: str, num_supernodes: int = 4, timeout: float = 400, cwd=PROJECT_DIR):
        command = [
            "flwr", "run", str(PROJECT_DIR), "--stream",
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--run-config", f'overrides="{overrides}"',
        ]  # fmt: skip
        return subprocess.run(
            command, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        stop_processes(processes_with_env("FLWR_HOME", str(self.home)))


@pytest.fixture(scope="session")
def flower(tmp_path_factory):
    env = FlowerEnv(tmp_path_factory.mktemp("flwr_home"))
    try:
        yield env
    finally:
        env.stop()
        assert not processes_with_env("FLWR_HOME", str(env.home)), "processes left running"


@pytest.fixture(scope="session")
def pretrained_checkpoint(tmp_path_factory) -> Path:
    """The README's pretrain command, run once for the end-to-end fine-tuning tests."""
    import sys

    ckpt = tmp_path_factory.mktemp("pretrained") / "ckpt.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "app.pretrain", "--out", str(ckpt), "dataset.public_fraction=0.2"],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_DIR,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt
