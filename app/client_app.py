"""ClientApp: `client_fn` reads run and node config once and builds a TorchClient."""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.client import Client, ClientApp
from flwr.common import Context, log

from app.config import load_config
from core.config import ExperimentConfig, client_resources
from core.data import NODE_DATA_PATH, data_spec, load_client_data, load_file_data
from core.evaluation import resolve_device
from protections.he.context import NODE_SECRET_CONTEXT
from core.finetune import build_finetune_model
from protections.workload.wire import node_capability
from clients.torch_client import TorchClient


def client_fn(context: Context) -> Client:
    return build_client(load_config(str(context.run_config.get("overrides", ""))), context)


def build_client(cfg: ExperimentConfig, context: Context) -> Client:
    """The client of one SuperNode for `cfg` (also used by benchmarks that start their own
    simulations)."""
    node_config = context.node_config
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    warn_if_undersized(cfg)
    spec = data_spec(cfg.dataset)
    if NODE_DATA_PATH in node_config:
        # Deployment: the site's own data file. Seeds differ per node as partitions do.
        site = int(node_config.get("partition-id", context.node_id % 1_000_003))
        train_data, val_data = load_file_data(
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
    model, wire_names = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    return TorchClient(
        model,
        train_data,
        val_data,
        spec.task,
        cfg.training,
        resolve_device(cfg.training.device),
        seed=cfg.seed * 100_003 + site,
        privacy=cfg.privacy,
        state=context,
        max_rounds=cfg.num_rounds,
        he_secret_context=node_config.get(NODE_SECRET_CONTEXT),
        wire_names=wire_names,
        compute=node_capability(dict(node_config), cfg.workload.capabilities, site),
    ).to_client()


def warn_if_undersized(cfg: ExperimentConfig) -> None:
    """In simulation, say so when Ray gave this client fewer CPUs than its training
    processes use (plain `flwr run .` takes client resources from --federation-config, not
    from the training config): the run works, but clients oversubscribe the cores."""
    import ray

    if not ray.is_initialized():
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
