"""`flwr run` in a Flower home of its own, on a copy of exactly the files Flower packs from the
project (the FAB's files, app/fab.py): `flwr run .` would walk the virtualenv on every run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.processes import isolated_flower_env, processes_with_env, stop_processes

PROJECT_DIR = Path(__file__).resolve().parents[2]


class FlowerEnv:
    """An isolated Flower home: `run()` calls `flwr run` with it; `stop()` ends everything."""

    def __init__(self, home: Path, app_dir: Path = PROJECT_DIR) -> None:
        self.home = home
        self.app_dir = app_dir
        self.env = {**os.environ, **isolated_flower_env(home)}

    def command(self, overrides: str, num_supernodes: int = 4) -> list[str]:
        return [
            "flwr", "run", str(self.app_dir), "--stream",
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            "--run-config", f'overrides="{overrides}"',
        ]  # fmt: skip

    def run(self, overrides: str, num_supernodes: int = 4, timeout: float = 400, cwd=PROJECT_DIR):
        return subprocess.run(
            self.command(overrides, num_supernodes),
            env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, overrides: str, num_supernodes: int = 4, cwd=PROJECT_DIR) -> subprocess.Popen:
        """`flwr run` in the background (its output to a pipe), for tests that act mid-run."""
        return subprocess.Popen(
            self.command(overrides, num_supernodes), env=self.env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def pids_running(self, executable: str) -> list[int]:
        """PIDs of this home's processes whose command line names `executable`
        (e.g. "flwr-simulation": the process that runs the ServerApp in simulation)."""
        found = []
        for pid in processes_with_env("FLWR_HOME", str(self.home)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(a.decode(errors="replace")).name == executable for a in argv[:2]):
                found.append(pid)
        return found

    def stop(self) -> None:
        stop_processes(processes_with_env("FLWR_HOME", str(self.home)))


def fab_files_copy(dest: Path) -> Path:
    """Copy the files of the project's FAB (what `flwr run .` packs) to `dest`
    (tests/test_fab.py checks that such a copy builds the project's FAB, byte for byte)."""
    from app.fab import copy_fab_files

    return copy_fab_files(dest, PROJECT_DIR)
