"""Local training loop of one client: mini-batch SGD/Adam with an optional FedProx term."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from app.config import TrainingConfig
from app.data import ArraySplit
from app.evaluation import loss_fn


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean loss over the last local epoch
    train_accuracy: float | None  # classification only
    num_examples: int  # examples in the local train split (FedAvg weight)
    steps: int


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"training.optimizer={cfg.optimizer!r}: use sgd or adam")


def train(
    model: nn.Module,
    data: ArraySplit,
    cfg: TrainingConfig,
    task: str,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `model` in place for `cfg.local_epochs` epochs over `data`.

    With `proximal_mu > 0` (FedProx) the loss gets (mu/2) * ||w - w_global||^2, with
    w_global the weights the model had on entry. With `max_steps` (capability workload,
    app/workload.py) training stops after that many steps; loss and accuracy then cover the
    examples of the last (partial) epoch.
    """
    if len(data) == 0:
        raise ValueError("this client has no training examples: check the partitioning")
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    criterion = loss_fn(task)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    generator = np.random.default_rng(seed)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    steps = 0
    for _ in range(cfg.local_epochs):
        if max_steps is not None and steps >= max_steps:
            break
        order = torch.from_numpy(generator.permutation(len(data)))
        epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
        for start in range(0, len(data), cfg.batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[start : start + cfg.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y)
            objective = loss
            if proximal_mu > 0:
                prox = sum(
                    torch.sum((p - g) ** 2) for p, g in zip(model.parameters(), global_params)
                )
                objective = loss + 0.5 * proximal_mu * prox
            objective.backward()
            optimizer.step()
            steps += 1
            epoch_loss += float(loss.detach()) * len(idx)
            epoch_seen += len(idx)
            if task == "classification":
                epoch_correct += int((out.detach().argmax(dim=1) == y).sum())
    accuracy = epoch_correct / epoch_seen if task == "classification" else None
    return TrainResult(epoch_loss / epoch_seen, accuracy, len(data), steps)
