"""Shared fixtures. End-to-end tests get their own FLWR_HOME and ports, and every process they
start (SuperLink, SuperExec, simulation, Ray) is stopped by PID afterwards.

`flower.run` runs `flwr run` on a copy of exactly the files Flower packs from the project
(tests/support/flower.py says why and checks the copy). (The sweep CLI, the notebooks and the
deployment tests still run `flwr run` on the project itself.)

MLflow tracking is off unless a test turns it on (`pytest_configure`).

Tiers (tests/support/tiers.py): a test without a tier marker is marked unit here, every
integration and e2e test is also marked slow, and a unit test that starts a process, opens a
network socket or a process group fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.flower import PROJECT_DIR, FlowerEnv, fab_files_copy
from tests.support.processes import processes_with_env

# The tier hooks (tests/support/tiers.py): found here by their names, like hooks defined here.
from tests.support.tiers import (  # noqa: F401
    pytest_collection_modifyitems,
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)

# pytester: tests/test_tiers.py runs pytest sessions of its own, in this process.
pytest_plugins = ["pytester"]


def pytest_configure(config):
    """MLflow tracking (app/tracking.py) is off for every run the tests start (it costs a run
    seconds of CPU), unless a test sets tracking.enabled=true (tests/test_tracking.py, the
    sweep test) or the suite runs with PRIVACY_FT_TRACKING=true. Runs in an isolated Flower
    home track into that home's store (tests/support/processes.py), never into ~/."""
    os.environ.setdefault("PRIVACY_FT_TRACKING", "false")


@pytest.fixture(autouse=True)
def writes_no_mlflow_store_into_the_repository():
    """MLflow puts a run's artifacts in ./mlruns of the working directory (the repository,
    under pytest) when an experiment was created without an artifact location: the test that
    does so fails here, by name, instead of its files being committed."""
    leak = PROJECT_DIR / "mlruns"
    existed = leak.exists()
    yield
    assert existed or not leak.exists(), f"this test wrote MLflow artifacts into {leak}"


@pytest.fixture(scope="session")
def flower(tmp_path_factory):
    app_dir = fab_files_copy(tmp_path_factory.mktemp("flower_app"))
    env = FlowerEnv(tmp_path_factory.mktemp("flwr_home"), app_dir)
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, metadata) of the default mlp pretrained in-process on digits' public split (5
    epochs), once per test module (tests/test_finetune.py, tests/test_lora.py)."""
    from tests.support.finetune import pretrain_on_public_split  # imports the ClientApp

    return pretrain_on_public_split(tmp_path_factory.mktemp("ckpt") / "mlp.pt")
