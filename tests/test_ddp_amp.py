"""DDP and AMP inside one client (clients/ddp.py, core/training.py): the same weights
whatever the number of processes, bf16 as good as fp32, clean failures, no orphans."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from app.config import load_config
from core.data import ArraySplit, centralized_test_split, data_spec, load_client_data
from core.evaluation import evaluate
from core.models import build_model
from app.sweep import flwr_run_command
from clients.ddp import DDPTimeoutError, DDPWorkerError, train_ddp
from core.training import check_precision, train

CPU = torch.device("cpu")


def child_pids() -> list[int]:
    """Live (non-zombie) processes whose parent is this test process, except
    multiprocessing's resource tracker (one per process that ever used "spawn", idle, and
    gone with its parent)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and state != "Z" and b"resource_tracker" not in cmdline:
            pids.append(int(entry.name))
    return pids


def digits_client(partition: int = 0, num_partitions: int = 3, overrides: str = ""):
    cfg = load_config(overrides)
    train_data, _ = load_client_data(
        cfg.dataset, cfg.partitioner, partition, num_partitions, cfg.seed
    )
    return cfg, train_data, data_spec(cfg.dataset)


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )


@pytest.mark.integration  # starts a gloo process group (spawned workers)
@pytest.mark.parametrize(
    "overrides,mu,max_steps",
    [
        ("training.local_epochs=2", 0.0, None),  # 431 examples: the last batch is partial
        # FedProx term, Adam, and the capability workload's stop mid-epoch after 50 steps
        ("training.local_epochs=2 model=cnn training.batch_size=10 training.optimizer=adam "
         "training.lr=0.01", 0.1, 50),
    ],
)
def test_ddp_two_processes_give_the_single_process_weights(overrides, mu, max_steps):
    cfg, data, spec = digits_client(overrides=overrides)
    single = build_model(cfg.model, spec, seed=1)
    ddp = build_model(cfg.model, spec, seed=1)
    kwargs = dict(seed=5, proximal_mu=mu, max_steps=max_steps)
    ref = train(single, data, cfg.training, spec.task, CPU, **kwargs)
    got = train_ddp(ddp, data, replace(cfg.training, world_size=2), spec.task, CPU, **kwargs)
    assert max_abs_diff(single, ddp) <= 1e-5
    assert max_abs_diff(single, build_model(cfg.model, spec, seed=1)) > 1e-2  # it trained
    full = -(-len(data) // cfg.training.batch_size) * cfg.training.local_epochs
    assert got.steps == ref.steps == (full if max_steps is None else max_steps)
    assert got.num_examples == ref.num_examples == len(data)
    assert got.train_loss == pytest.approx(ref.train_loss, abs=1e-5)
    assert got.train_accuracy == pytest.approx(ref.train_accuracy, abs=1e-9)
    assert child_pids() == []


@pytest.mark.integration  # in .ci/run's fresh environment its first bf16 training started processes
def test_bf16_autocast_ends_within_one_point_of_fp32_on_digits():
    cfg, data, spec = digits_client(num_partitions=1, overrides="training.local_epochs=8")
    test = centralized_test_split(cfg.dataset, cfg.seed)
    accuracy = {}
    for precision in ("fp32", "bf16"):
        model = build_model(cfg.model, spec, seed=0)
        train(model, data, replace(cfg.training, precision=precision), spec.task, CPU, seed=3)
        accuracy[precision] = evaluate(model, test, spec.task, CPU)["accuracy"]
    assert accuracy["fp32"] >= 0.9
    assert abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.01, accuracy


def test_bf16_really_autocasts_the_forward_pass():
    seen = []
    model = nn.Linear(4, 3)
    model.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    rng = np.random.default_rng(0)
    data = ArraySplit(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, 8))
    cfg = replace(load_config().training, local_epochs=1, batch_size=8, precision="bf16")
    train(model, data, cfg, "classification", CPU, seed=0)
    assert seen == [torch.bfloat16]
    assert model.weight.dtype == torch.float32  # master weights stay float32


def test_fp16_on_cpu_is_refused_on_the_client_with_the_fix():
    with pytest.raises(ValueError, match="precision=bf16"):
        check_precision("fp16", CPU)


class RaiseOnRank1(nn.Module):
    """Rank 1 raises in its first forward pass; rank 0 waits in the gradient all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("injected failure on rank 1")
        return self.fc(x)


class HangOnRank1(RaiseOnRank1):
    def forward(self, x):
        if dist.is_initialized() and dist.get_rank() == 1:
            time.sleep(600)
        return self.fc(x)


@pytest.mark.integration  # starts a gloo process group (spawned workers)
def test_a_failing_worker_raises_its_traceback_and_leaves_no_process():
    cfg, data, spec = digits_client(overrides="training.world_size=2")
    started = time.monotonic()
    with pytest.raises(DDPWorkerError) as info:
        train_ddp(RaiseOnRank1(), data, cfg.training, spec.task, CPU, seed=0)
    assert "rank1" in str(info.value) and "injected failure on rank 1" in str(info.value)
    assert time.monotonic() - started < 120  # not the 1800 s collective timeout
    assert child_pids() == [] and multiprocessing.active_children() == []


@pytest.mark.integration  # starts a gloo process group (spawned workers)
def test_a_hung_worker_hits_the_timeout_and_leaves_no_process():
    cfg, data, spec = digits_client(overrides="training.world_size=2 training.ddp_timeout_s=10")
    started = time.monotonic()
    with pytest.raises(DDPTimeoutError, match="ddp_timeout_s=10"):
        train_ddp(HangOnRank1(), data, cfg.training, spec.task, CPU, seed=0)
    assert 10 <= time.monotonic() - started < 50
    assert child_pids() == [] and multiprocessing.active_children() == []


@pytest.mark.integration  # starts a gloo process group (spawned workers)
def test_concurrent_clients_get_their_own_rendezvous_ports():
    """Two clients of one machine train at once (as Ray runs them): each gets its own
    store port, and both produce their single-process weights."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, data, spec = digits_client(overrides="training.local_epochs=1 training.world_size=2")
    models = [build_model(cfg.model, spec, seed=s) for s in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: train_ddp(m, data, cfg.training, spec.task, CPU, seed=4), models))
    for seed, model in zip((1, 2), models):
        ref = build_model(cfg.model, spec, seed=seed)
        train(ref, data, replace(cfg.training, world_size=1), spec.task, CPU, seed=4)
        assert max_abs_diff(ref, model) <= 1e-5
    assert child_pids() == []


def test_simulated_client_resources_follow_the_training_config():
    def federation(overrides: str) -> str:
        cmd = flwr_run_command(load_config(overrides), [])
        return cmd[cmd.index("--federation-config") + 1]

    assert "client-resources-num-cpus=1 client-resources-num-gpus=0" in federation("")
    assert "client-resources-num-cpus=2 client-resources-num-gpus=0" in federation("training=ddp")
    assert "num-cpus=4 " in federation("training=ddp training.torch_threads=2")
    assert "num-gpus=2" in federation("training=ddp training.device=cuda")
    assert "num-cpus=3 client-resources-num-gpus=0.5" in federation(
        "training=ddp simulation.client_cpus=3 simulation.client_gpus=0.5"
    )


@pytest.mark.e2e
def test_flwr_run_with_ddp_and_bf16_learns_digits(flower, tmp_path):
    out = tmp_path / "ddp"
    proc = flower.run(
        f"training.world_size=2 training.precision=bf16 num_rounds=3 "
        f"strategy.fraction_train=1.0 output_dir={out}",
        num_supernodes=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["clients"] for r in results["rounds"]] == [{"trained": 2, "failed": 0}] * 3
    assert results["final"]["centralized"]["accuracy"] >= 0.85
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config and "precision: bf16" in config
