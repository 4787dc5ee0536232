"""ClientApp: `client_fn` reads run and node config and builds a TorchClient.

A process that serves many messages (a simulation's Ray worker) pays the per-process work
once: the validated config is cached by the run's overrides string, the model by what it is
built from, and a site's own data file (node config `data-path`) by its path, size,
modification time and the data set config and seed it is split with. Each message gets that
model back in its freshly built state (every tensor, the frozen ones included; the trained
ones are then set from the parameters the message carries), and copies of the file's arrays,
so no message sees another's training. Flower 1.41's SuperNode (`--isolation subprocess`)
starts a ClientApp process per message: there every message still reads and checks its file.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from functools import lru_cache
from logging import WARNING
from pathlib import Path

import torch
from flwr.client import Client, ClientApp
from flwr.common import Context, log
from torch import nn

from app.config import load_config
from clients.pipeline import build_pipeline
from clients.torch_client import TorchClient
from core.config import DatasetConfig, ExperimentConfig, client_resources
from core.data import (
    NODE_DATA_PATH,
    ArraySplit,
    config_key,
    data_spec,
    load_client_data,
    load_file_data,
)
from core.evaluation import resolve_device
from core.finetune import build_finetune_model
from protections.he.context import NODE_SECRET_CONTEXT
from protections.workload.wire import node_capability


def client_fn(context: Context) -> Client:
    cfg = cached_config(str(context.run_config.get("overrides", "")))
    return build_client(cfg, context, model=cached_model(cfg))


@lru_cache(maxsize=8)
def cached_config(overrides: str) -> ExperimentConfig:
    """The validated config of a run's overrides, once per process (validation builds the
    model to check the fine-tuning options). Callers only read it."""
    return load_config(overrides)


_models = threading.local()  # per thread: two clients served at once never share a model

SITE_FILES_CACHED = 4  # (file, config, seed) entries a process keeps; the oldest goes first
_site_files: OrderedDict[tuple, tuple[tuple, tuple[ArraySplit, ArraySplit]]] = OrderedDict()
_site_files_lock = threading.Lock()


def cached_model(cfg: ExperimentConfig) -> tuple[nn.Module, list[str] | None]:
    """`build_finetune_model` for `cfg`, built once per process and thread, and reset to its
    built state on every call (its trained tensors are then set from the received model)."""
    spec = data_spec(cfg.dataset)
    # A checkpoint rewritten at the same path (a new pretraining) is a new model.
    stamp = os.stat(cfg.model.pretrained).st_mtime_ns if cfg.model.pretrained else None
    key = repr((cfg.model, spec, cfg.seed, stamp))
    cache = getattr(_models, "entries", None)
    if cache is None:
        cache = _models.entries = {}
    if key not in cache:
        model, wire_names = build_finetune_model(cfg.model, spec, seed=cfg.seed)
        built = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cache.clear()  # one run's model per process: a new run's replaces it
        cache[key] = (model, wire_names, built)
    model, wire_names, built = cache[key]
    model.load_state_dict(built)
    for p in model.parameters():
        p.grad = None
    return model, wire_names


def cached_file_data(path: str, cfg: DatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """`core.data.load_file_data` (a site's file, read and checked), once per process for the
    same file, data set config and seed. The file counts as changed, and is read again, when
    its size, modification time (ns) or inode differ (a copy that keeps the time, rsync -t,
    is a new inode). The cached arrays are read-only; each call returns writable copies, so
    training can never change what the next message trains on. A file that fails its checks
    is not cached: the next message reads it again (fixed, it loads)."""
    resolved = str(Path(path).expanduser().resolve())
    key = (resolved, config_key(cfg), seed)  # the key core/data.py's caches use
    stamp = _file_stamp(resolved)
    with _site_files_lock:
        entry = _site_files.get(key)
        if entry is not None and stamp is not None and entry[0] == stamp:
            _site_files.move_to_end(key)
            return _copies(entry[1])
    splits = load_file_data(path, cfg, seed)  # raises, naming the file, on a bad one
    for split in splits:
        split.x.setflags(write=False)
        split.y.setflags(write=False)
    if stamp is not None and _file_stamp(resolved) == stamp:  # not rewritten while read
        with _site_files_lock:
            _site_files[key] = (stamp, splits)
            _site_files.move_to_end(key)
            while len(_site_files) > SITE_FILES_CACHED:
                _site_files.popitem(last=False)
    return _copies(splits)


def _file_stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # load_file_data says what is wrong with the path
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _copies(splits: tuple[ArraySplit, ArraySplit]) -> tuple[ArraySplit, ArraySplit]:
    return tuple(ArraySplit(s.x.copy(), s.y.copy()) for s in splits)  # type: ignore[return-value]


def build_client(
    cfg: ExperimentConfig,
    context: Context,
    model: tuple[nn.Module, list[str] | None] | None = None,
) -> Client:
    """The client of one SuperNode for `cfg` (also used by tests and benchmarks that start
    their own simulations). `model`: (model, wire names) to use instead of building them."""
    node_config = context.node_config
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    warn_if_undersized(cfg)
    spec = data_spec(cfg.dataset)
    if NODE_DATA_PATH in node_config:
        # Deployment: the site's own data file. Seeds differ per node as partitions do.
        site = int(node_config.get("partition-id", context.node_id % 1_000_003))
        train_data, val_data = cached_file_data(
            str(node_config[NODE_DATA_PATH]), cfg.dataset, cfg.seed + site
        )
    else:
        try:
            site = int(node_config["partition-id"])
            num_partitions = int(node_config["num-partitions"])
        except KeyError as err:
            raise ValueError(
                f"node config lacks {err}: start the SuperNode with --node-config "
                f"'partition-id=<i> num-partitions=<n>' or '{NODE_DATA_PATH}=<file.npz|csv>'"
            ) from err
        train_data, val_data = load_client_data(
            cfg.dataset, cfg.partitioner, site, num_partitions, cfg.seed
        )
    model, wire_names = model or build_finetune_model(cfg.model, spec, seed=cfg.seed)
    steps = build_pipeline(
        cfg,
        he_secret_context=node_config.get(NODE_SECRET_CONTEXT),
        compute=node_capability(dict(node_config), cfg.workload.capabilities, site),
    )
    return TorchClient(
        model,
        train_data,
        val_data,
        spec.task,
        cfg.training,
        resolve_device(cfg.training.device),
        seed=cfg.seed * 100_003 + site,
        steps=steps,
        state=context,
        wire_names=wire_names,
    ).to_client()


def warn_if_undersized(cfg: ExperimentConfig) -> None:
    """In simulation, say so when Ray gave this client fewer CPUs than its training
    processes use (plain `flwr run .` takes client resources from --federation-config, not
    from the training config): the run works, but clients oversubscribe the cores.

    Ray is looked up in `sys.modules`, not imported: inside a Ray actor it is already loaded,
    and a SuperNode's ClientApp process (one per message) would pay Ray's import for nothing."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return  # a SuperNode's ClientApp process: the operator sizes the machine
    needed_cpus, _ = client_resources(cfg)
    assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if assigned < needed_cpus:
        log(
            WARNING,
            "training.world_size=%d x torch_threads=%d needs %d CPUs per client, Ray gave %g: "
            "pass --federation-config 'client-resources-num-cpus=%d' to flwr run (app.sweep "
            "and run_experiment do this themselves)",
            cfg.training.world_size,
            max(1, cfg.training.torch_threads),
            needed_cpus,
            assigned,
            needed_cpus,
        )


app = ClientApp(client_fn=client_fn)
