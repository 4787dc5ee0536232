"""A real HE client for tests: a TorchClient that holds freshly provisioned secret keys."""

from __future__ import annotations

import torch
from flwr.common import Context, RecordDict

from app.config import load_config
from clients.pipeline import build_pipeline
from clients.torch_client import TorchClient
from core.data import data_spec, load_client_data
from core.models import build_model, get_weights
from protections.he.context import HEParams, load_context, provision


def he_client(tmp_path, overrides, params: HEParams | None = None):
    """A real TorchClient (partition 0 of 4) holding freshly provisioned secret keys (default
    HEParams); returns (client, secret context, public context, initial weights)."""
    secret_path, public_path = provision(params or HEParams(), tmp_path)
    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    train, val = load_client_data(cfg.dataset, cfg.partitioner, 0, 4, cfg.seed)
    model = build_model(cfg.model, spec, seed=0)
    initial = get_weights(model)
    state = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client = TorchClient(
        model, train, val, spec.task, cfg.training, torch.device("cpu"), seed=1,
        steps=build_pipeline(cfg, he_secret_context=str(secret_path)), state=state,
    )  # fmt: skip
    return client, load_context(secret_path), load_context(public_path), initial
