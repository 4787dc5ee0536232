"""One client's local-epoch time: fp32 vs bf16/fp16 autocast vs DDP, side by side in one run.

    python -m benchmarks.client_training                 # CPU: digits, the project's CNN
    python -m benchmarks.client_training --device cuda   # GPU: a VGG-style CNN on 3x32x32

Every setting trains the same model from the same initial weights through the product's own
code paths (`core.training.train`, `clients.ddp.train_ddp`). The time of one local epoch
is the training loop's own clock (`TrainResult.seconds`, rank 0's under DDP) divided by
`--epochs`; start-up (spawning DDP workers, importing torch there, the rendezvous, copying
the weights back) is the rest of the call's wall time. Ratios are to fp32 in one process
(> 1: faster). Each figure is the median of `--repeats` runs.

The CUDA model: conv 64-128-256-512 (two 3x3 convs per stage, max-pooling between), a
linear head, on synthetic 3x32x32 images (random, labels from a fixed random teacher): big
enough that the matrix units, not Python, set the pace. Data sit on the GPU (train() moves
them once). On CUDA, DDP runs one process per visible GPU when there are at least two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path


import numpy as np
import torch
from torch import nn

from app.config import load_config
from core.data import ArraySplit, data_spec, load_client_data
from core.models import build_model
from clients.ddp import train_ddp
from core.training import train


class VGGish(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in (64, 128, 256, 512):
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(),
                nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2),
            ]  # fmt: skip
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 3, 32, 32)
        return self.head(torch.flatten(self.features(x), 1))


def synthetic_images(n: int, seed: int = 0) -> ArraySplit:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3 * 32 * 32)).astype(np.float32)
    teacher = rng.normal(size=(3 * 32 * 32, 10)).astype(np.float32)
    return ArraySplit(x, (x @ teacher).argmax(axis=1).astype(np.int64))


def workload(device: str):
    """(model factory, data, training config) for the device's benchmark."""
    if device == "cuda":
        cfg = load_config("training.device=cuda training.batch_size=256 training.lr=0.01")
        return (lambda: VGGish()), synthetic_images(8192), cfg.training
    cfg = load_config(
        "model=cnn model.channels=[64,128] model.hidden_sizes=[256] training.device=cpu "
        "training.batch_size=64"
    )
    data, _ = load_client_data(cfg.dataset, cfg.partitioner, 0, 1, cfg.seed)
    spec = data_spec(cfg.dataset)
    return (lambda: build_model(cfg.model, spec, seed=0)), data, cfg.training


def timed_run(make_model, data, cfg, device, epochs: int) -> tuple[float, float]:
    """(seconds per local epoch, start-up seconds) of one call."""
    model = make_model()
    run_cfg = replace(cfg, local_epochs=epochs)
    fn = train_ddp if run_cfg.world_size > 1 else train
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn(model, data, run_cfg, "classification", device, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result.seconds / epochs, time.perf_counter() - started - result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    make_model, data, base = workload(args.device)
    torch.set_num_threads(max(1, base.torch_threads))
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    settings = [("fp32", 1)]
    settings += [("fp16", 1), ("bf16", 1)] if args.device == "cuda" else [("bf16", 1)]
    if args.device == "cpu":
        settings += [("fp32", 2), ("bf16", 2)]
    elif gpus >= 2:
        settings += [("fp32", gpus), ("fp16", gpus)]
    name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    params = sum(p.numel() for p in make_model().parameters())
    print(f"device: {name}; torch {torch.__version__}; {len(data)} examples, "
          f"{params:,} parameters, batch {base.batch_size}, {base.torch_threads} thread(s) "
          f"per process")  # fmt: skip
    if args.device == "cuda":
        timed_run(make_model, data, base, device, 1)  # warm-up: cuDNN autotuning, allocator
    rows = []
    for precision, world in settings:
        cfg = replace(base, precision=precision, world_size=world)
        runs = [timed_run(make_model, data, cfg, device, args.epochs) for _ in range(args.repeats)]
        per_epoch = statistics.median(r[0] for r in runs)
        rows.append((precision, world, per_epoch, statistics.median(r[1] for r in runs)))
        print(f"  measured {precision} x{world}: {per_epoch:.3f} s/epoch", flush=True)
    fp32 = rows[0][2]
    print()
    print("| precision | processes | s / local epoch | speed vs fp32 | start-up s |")
    print("| --- | --- | --- | --- | --- |")
    for precision, world, per_epoch, startup in rows:
        print(f"| {precision} | {world} | {per_epoch:.3f} | {fp32 / per_epoch:.2f}x | "
              f"{startup:.2f} |")  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
