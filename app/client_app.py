"""ClientApp: `client_fn` reads run and node config once and builds a TorchClient."""

from __future__ import annotations

import torch
from flwr.client import Client, ClientApp
from flwr.common import Context

from app.config import ExperimentConfig, load_config
from app.data import data_spec, load_client_data
from app.evaluation import resolve_device
from app.he_context import NODE_SECRET_CONTEXT
from app.finetune import build_finetune_model
from app.workload import node_capability
from clients.torch_client import TorchClient


def client_fn(context: Context) -> Client:
    return build_client(load_config(str(context.run_config.get("overrides", ""))), context)


def build_client(cfg: ExperimentConfig, context: Context) -> Client:
    """The client of one SuperNode for `cfg` (also used by benchmarks that start their own
    simulations)."""
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}: start the SuperNode with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from err
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    spec = data_spec(cfg.dataset)
    train_data, val_data = load_client_data(
        cfg.dataset, cfg.partitioner, partition_id, num_partitions, cfg.seed
    )
    model, wire_names = build_finetune_model(cfg.model, spec)
    return TorchClient(
        model,
        train_data,
        val_data,
        spec.task,
        cfg.training,
        resolve_device(cfg.training.device),
        seed=cfg.seed * 100_003 + partition_id,
        privacy=cfg.privacy,
        state=context,
        max_rounds=cfg.num_rounds,
        he_secret_context=context.node_config.get(NODE_SECRET_CONTEXT),
        wire_names=wire_names,
        compute=node_capability(dict(context.node_config), cfg.workload.capabilities, partition_id),
    ).to_client()


app = ClientApp(client_fn=client_fn)
