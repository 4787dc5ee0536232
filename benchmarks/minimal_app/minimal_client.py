"""Minimal ClientApp: the project's MLP trained (core/training.py) and evaluated on the
SuperNode's digits partition (node config partition-id / num-partitions, as in the project)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from core.data import load_client_data
from core.evaluation import evaluate
from core.training import train
from minimal_task import experiment, model

app = ClientApp()


def _setup(msg: Message, context: Context):
    overrides = str(context.run_config["overrides"])
    cfg, spec = experiment(overrides)
    if cfg.training.torch_threads > 0:
        torch.set_num_threads(cfg.training.torch_threads)
    site = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    train_data, val_data = load_client_data(cfg.dataset, cfg.partitioner, site, n, cfg.seed)
    net = model(overrides)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, spec, site, net, train_data, val_data


@app.train()
def fit(msg: Message, context: Context) -> Message:
    cfg, spec, site, net, train_data, _ = _setup(msg, context)
    result = train(net, train_data, cfg.training, spec.task, torch.device("cpu"), seed=cfg.seed * 100_003 + site)
    metrics = MetricRecord({"train_loss": result.train_loss, "num-examples": result.num_examples})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def validate(msg: Message, context: Context) -> Message:
    _, spec, _, net, _, val_data = _setup(msg, context)
    metrics = evaluate(net, val_data, spec.task, torch.device("cpu"))
    # Flower's FedAvg averages only keys every reply has: per-class recall (recall_<k>) exists
    # only for the classes a site's split holds, so a skewed or small split would differ.
    metrics = MetricRecord({k: metrics[k] for k in ("loss", "accuracy")} | {"num-examples": len(val_data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
