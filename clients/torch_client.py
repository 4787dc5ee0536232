"""The NumPyClient every SuperNode runs: receive the global model, train locally, report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from torch import nn

from app.config import TrainingConfig
from app.data import ArraySplit
from app.evaluation import evaluate
from app.models import get_weights, set_weights
from clients.training import train


@dataclass(frozen=True)
class FitInstructions:
    """What the server asks of this round, parsed once at the edge of `fit`."""

    server_round: int
    local_epochs: int
    lr: float
    proximal_mu: float

    @classmethod
    def from_config(cls, config: dict[str, Scalar], defaults: TrainingConfig) -> FitInstructions:
        return cls(
            server_round=int(config.get("server_round", 0)),
            local_epochs=int(config.get("local_epochs", defaults.local_epochs)),
            lr=float(config.get("lr", defaults.lr)),
            proximal_mu=float(config.get("proximal_mu", 0.0)),  # sent by Flower's FedProx
        )


class TorchClient(NumPyClient):
    def __init__(
        self,
        model: nn.Module,
        train_data: ArraySplit,
        val_data: ArraySplit,
        task: str,
        training: TrainingConfig,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model.to(device)
        self.train_data = train_data
        self.val_data = val_data
        self.task = task
        self.training = training
        self.device = device
        self.seed = seed

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        ins = FitInstructions.from_config(config, self.training)
        set_weights(self.model, parameters)
        training = TrainingConfig(
            **{**vars(self.training), "local_epochs": ins.local_epochs, "lr": ins.lr}
        )
        result = train(
            self.model,
            self.train_data,
            training,
            self.task,
            self.device,
            seed=self.seed + 7919 * ins.server_round,
            proximal_mu=ins.proximal_mu,
        )
        metrics: dict[str, Scalar] = {"train_loss": result.train_loss, "steps": result.steps}
        if result.train_accuracy is not None:
            metrics["train_accuracy"] = result.train_accuracy
        return get_weights(self.model), result.num_examples, metrics

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        metrics = evaluate(self.model, self.val_data, self.task, self.device)
        loss = metrics.pop("loss")
        return loss, len(self.val_data), metrics
