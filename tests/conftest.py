"""Shared fixtures. End-to-end tests get their own FLWR_HOME and ports, and every process they
start (SuperLink, SuperExec, simulation, Ray) is stopped by PID afterwards."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from app.processes import isolated_flower_env, processes_with_env, stop_processes

PROJECT_DIR = Path(__file__).resolve().parents[1]


class FlowerEnv:
    """An isolated Flower home: `run()` calls `flwr run` with it; `stop()` ends everything."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, **isolated_flower_env(home)}

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
