"""Data-parallel local training inside one Flower client (`training.world_size=N > 1`).

Flower sees one client; its `fit` starts N worker processes that train the client's local
step with `DistributedDataParallel` (gloo on CPU, NCCL on CUDA unless
`training.ddp_backend` says otherwise), and hands rank 0's weights back as the client's
result. Clients/training.py explains why the result equals one process training on the
same global batches.

Process management, and why it is ours: `torch.multiprocessing.spawn` joins its workers
but has no deadline, and `torchrun`/elastic launch a separate launcher per call and pick
ports from a fixed default. Here:
- rendezvous: the client opens a `TCPStore` on port 0 (the OS picks a free port, held
  until the workers are done), so concurrent clients on one machine never collide;
- start: "spawn" (a fresh interpreter), safe inside Ray actors and SuperNode ClientApp
  processes that run threads (fork is not);
- failure: a worker that raises writes its traceback and exits non-zero; the client then
  kills the others and raises `DDPWorkerError` with the traceback, so Flower records the
  client as failed for the round;
- timeout: past `training.ddp_timeout_s` every worker is killed and `DDPTimeoutError`
  raised; collective operations time out too, so a lost peer cannot hang a worker forever;
- no orphans: workers are killed and reaped on every path out of `train_ddp`, and on Linux
  each asks the kernel to SIGKILL it if the client process dies first (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import datetime
import io
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.config import TrainingConfig
from core.data import ArraySplit
from core.training import Shard, TrainResult, train

RESULT_FILE = "rank0.pt"
HOST = "127.0.0.1"  # workers of one client always share its machine


class DDPWorkerError(RuntimeError):
    """A DDP worker of this client failed; the message carries its traceback."""


class DDPTimeoutError(RuntimeError):
    """The client's DDP training ran past training.ddp_timeout_s."""


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, pickled into the spawned process."""

    # The model as torch.save bytes, not as a Module: multiprocessing pickles tensors by
    # moving them to shared memory, so every rank would update the same storage.
    model_bytes: bytes
    data: ArraySplit
    cfg: TrainingConfig
    task: str
    seed: int
    proximal_mu: float
    max_steps: int | None
    backend: str
    device_type: str  # cpu | cuda (rank r uses cuda:r)
    port: int
    out_dir: str


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ValueError(
            f"training.ddp_backend=nccl needs CUDA, but this client trains on {device}: "
            "use ddp_backend=gloo or auto"
        )
    return requested


def check_devices(device: torch.device, world_size: int) -> None:
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"training.world_size={world_size} on CUDA needs {world_size} visible GPUs, this "
            f"client sees {torch.cuda.device_count()}: lower training.world_size, give the "
            "client more GPUs (simulation.client_gpus / CUDA_VISIBLE_DEVICES), or train on cpu"
        )


def train_ddp(
    model: nn.Module,
    data: ArraySplit,
    cfg: TrainingConfig,
    task: str,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place with `cfg.world_size` DDP worker processes; the result and
    the weights are the client's (identical on every rank, taken from rank 0)."""
    world_size = cfg.world_size
    device = torch.device(device)
    backend = resolve_backend(cfg.ddp_backend, device)
    check_devices(device, world_size)
    if len(data) == 0:
        raise ValueError("this client has no training examples: check the partitioning")
    # Port 0: the OS picks a free port; this process keeps it (the store) until the end.
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ddp-client-") as out_dir:
        job = WorkerJob(
            model_bytes=_to_bytes(model.to("cpu")),
            data=data,
            cfg=cfg,
            task=task,
            seed=seed,
            proximal_mu=proximal_mu,
            max_steps=max_steps,
            backend=backend,
            device_type=device.type,
            port=store.port,
            out_dir=out_dir,
        )
        workers = [
            ctx.Process(target=_worker, args=(rank, job), name=f"ddp-rank{rank}", daemon=True)
            for rank in range(world_size)
        ]
        try:
            for w in workers:
                w.start()
            _wait(workers, Path(out_dir), cfg.ddp_timeout_s)
            outcome = torch.load(Path(out_dir) / RESULT_FILE, weights_only=False)
        finally:
            _stop(workers)
            del store
    model.load_state_dict(outcome["state_dict"])
    model.to(device)
    return outcome["result"]


def _to_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def _wait(workers: list, out_dir: Path, timeout_s: float) -> None:
    """Until every worker exited 0; raise on the first failure or at the deadline."""
    deadline = time.monotonic() + timeout_s
    pending = {w.sentinel: w for w in workers}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DDPTimeoutError(
                f"DDP training ran past training.ddp_timeout_s={timeout_s:g} s; its "
                f"{len(workers)} workers were stopped"
            )
        for sentinel in multiprocessing.connection.wait(list(pending), timeout=remaining):
            worker = pending.pop(sentinel)
            worker.join()
            if worker.exitcode != 0:
                raise DDPWorkerError(_failure_message(worker, workers, out_dir))


def _failure_message(failed, workers: list, out_dir: Path) -> str:
    rank = workers.index(failed)
    # The first worker to die may only be a victim (its peer's collective broke): report
    # the traceback of any rank that raised, preferring the one that exited.
    reports = [out_dir / f"error-rank{rank}.txt"] + sorted(out_dir.glob("error-rank*.txt"))
    for path in reports:
        if path.exists():
            return f"DDP worker {path.stem.removeprefix('error-')} failed:\n{path.read_text()}"
    how = f"signal {-failed.exitcode}" if failed.exitcode < 0 else f"exit {failed.exitcode}"
    return f"DDP worker rank{rank} died ({how}) without a Python traceback"


def _stop(workers: list, grace_s: float = 5.0) -> None:
    """Terminate and reap every worker that is still alive (SIGTERM, then SIGKILL)."""
    for w in workers:
        if w.is_alive():
            w.terminate()
    deadline = time.monotonic() + grace_s
    for w in workers:
        if w.pid is not None:
            w.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join()


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its client process dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _worker(rank: int, job: WorkerJob) -> None:
    _die_with_parent()
    out_dir = Path(job.out_dir)
    try:
        threads = job.cfg.torch_threads
        if threads > 0:
            torch.set_num_threads(threads)
        world_size = job.cfg.world_size
        store = dist.TCPStore(HOST, job.port, is_master=False)
        dist.init_process_group(
            job.backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=job.cfg.ddp_timeout_s),
        )
        if job.device_type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        model = torch.load(io.BytesIO(job.model_bytes), weights_only=False).to(device)
        ddp = DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        result = train(
            ddp,
            job.data,
            job.cfg,
            job.task,
            device,
            seed=job.seed,
            proximal_mu=job.proximal_mu,
            max_steps=job.max_steps,
            shard=Shard(rank=rank, world_size=world_size),
        )
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            torch.save({"state_dict": state, "result": result}, out_dir / RESULT_FILE)
        dist.destroy_process_group()
    except BaseException:
        (out_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        sys.stderr.write(f"DDP worker rank{rank} failed:\n{traceback.format_exc()}")
        code = 1
    else:
        code = 0
    # os._exit, not a normal interpreter exit: tearing down torch's C++ globals (the store
    # client's and gloo's threads) at exit aborts now and then ("terminate called without
    # an active exception", SIGABRT, measured in about 1 run in 15 here). The result file is
    # closed already; nothing else needs flushing but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

