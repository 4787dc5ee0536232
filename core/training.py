"""Local training loop of one client: mini-batch SGD/Adam with an optional FedProx term and
mixed precision, in one process or as one rank of a DDP group (clients/ddp.py).

Why one loop serves both: the client's trajectory must not depend on how many processes
compute it. Every rank draws the same epoch permutation from `seed`; the client's global
batch k is `order[k*B:(k+1)*B]`, exactly as in one process. `DistributedSampler` (no shuffle)
deals the positions round-robin, so rank r's local batch k holds every N-th position of
global batch k; the positions it pads with (to make the epoch divisible by N) get weight 0.
Each rank's loss is its samples' summed loss times N / |global batch|, so DDP's gradient
average is the mean over the global batch, the single-process gradient. The proximal term
is the same on every rank and survives the average unchanged.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from core.config import TrainingConfig
from core.data import ArraySplit

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean loss over the last local epoch
    train_accuracy: float | None  # classification only
    num_examples: int  # examples in the local train split (FedAvg weight)
    steps: int
    seconds: float = 0.0  # the epochs' wall time (without a DDP group's start-up)


@dataclass(frozen=True)
class Shard:
    """This process's place in a DDP group (rank 0 of 1 without DDP)."""

    rank: int = 0
    world_size: int = 1


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"training.optimizer={cfg.optimizer!r}: use sgd or adam")


def check_precision(precision: str, device: torch.device) -> None:
    """Config validation catches fp16 with device=cpu; device=auto resolves on the client."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"training.precision=fp16 needs a CUDA device, but this client trains on "
            f"{device}: use training.precision=bf16 (or fp32) on CPU"
        )
    if precision not in ("fp32", *AMP_DTYPES):
        raise ValueError(f"training.precision={precision!r}: use fp32, bf16 or fp16")


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Each sample's loss in float32 (cross-entropy, or MSE averaged over output dims), so
    its mean is `core.evaluation.loss_fn(task)`."""
    out = out.float()
    if task == "classification":
        return nn.functional.cross_entropy(out, y, reduction="none")
    return nn.functional.mse_loss(out, y.float(), reduction="none").flatten(1).mean(dim=1)


def train(
    model: nn.Module,
    data: ArraySplit,
    cfg: TrainingConfig,
    task: str,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    shard: Shard = Shard(),
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.local_epochs` epochs over `data`.

    With `proximal_mu > 0` (FedProx) the loss gets (mu/2) * ||w - w_global||^2, with
    w_global the weights the model had on entry. With `shard.world_size > 1`, `model` is
    this rank's DistributedDataParallel wrapper and `data` the client's whole train split
    (see the module docstring); the returned metrics are the client's, on every rank.
    With `max_steps` (capability workload, protections/workload/wire.py) training stops after that many
    steps; loss and accuracy then cover the examples of the last (partial) epoch.
    """
    device = torch.device(device)
    n = len(data)
    if n == 0:
        raise ValueError("this client has no training examples: check the partitioning")
    check_precision(cfg.precision, device)
    world = shard.world_size
    local_batch = cfg.batch_size // world
    if local_batch * world != cfg.batch_size:
        raise ValueError(
            f"training.batch_size={cfg.batch_size} does not split across "
            f"training.world_size={world} processes: use a multiple of {world}"
        )
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    amp_dtype = AMP_DTYPES.get(cfg.precision)
    # GradScaler only for float16: bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    # Positions (into the epoch's permutation) this rank trains on, and which are padding.
    sampler = DistributedSampler(
        range(n), num_replicas=world, rank=shard.rank, shuffle=False, drop_last=False
    )
    positions = torch.tensor(list(sampler), dtype=torch.long)
    is_real = shard.rank + world * torch.arange(len(positions)) < n
    generator = np.random.default_rng(seed)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    if device.type == "cuda":  # one copy to the GPU, not one per batch
        x_all, y_all = x_all.to(device), y_all.to(device)
        positions, is_real = positions.to(device), is_real.to(device)
    steps = 0
    started = time.perf_counter()
    for _ in range(cfg.local_epochs):
        if max_steps is not None and steps >= max_steps:
            break
        order = torch.from_numpy(generator.permutation(n)).to(x_all.device)
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        seen = torch.zeros((), dtype=torch.float64)
        for k, start in enumerate(range(0, n, cfg.batch_size)):
            if max_steps is not None and steps >= max_steps:
                break
            local = slice(k * local_batch, (k + 1) * local_batch)
            idx = order[positions[local]]
            weight = is_real[local].to(device=device, dtype=torch.float32)
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            global_count = min(cfg.batch_size, n - start)
            optimizer.zero_grad(set_to_none=True)
            autocast = (
                torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                out = model(x)
            losses = per_sample_loss(out, y, task)
            objective = (losses * weight).sum() * (world / global_count)
            if proximal_mu > 0:
                prox = sum(
                    torch.sum((p - g) ** 2) for p, g in zip(model.parameters(), global_params)
                )
                objective = objective + 0.5 * proximal_mu * prox
            if scaler is not None:
                scaler.scale(objective).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                objective.backward()
                optimizer.step()
            steps += 1
            loss_sum += float((losses.detach() * weight).sum())
            seen += float(weight.sum())
            if task == "classification":
                correct += float(((out.detach().argmax(dim=1) == y).float() * weight).sum())
    if world > 1:  # the client's metrics: sums over all ranks
        totals = torch.stack([loss_sum, correct, seen]).to(device)
        torch.distributed.all_reduce(totals)
        loss_sum, correct, seen = totals.cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    accuracy = float(correct / seen) if task == "classification" else None
    return TrainResult(float(loss_sum / seen), accuracy, n, steps, seconds)
