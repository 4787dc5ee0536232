"""The NumPyClient every SuperNode runs: receive the global model, train locally, report.

It knows no protection: each one is a step of its pipeline (protections/client_step.py),
built from config in clients/pipeline.py, which `fit` and `evaluate` apply around the task's
own local training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.client import NumPyClient
from flwr.common import Context, NDArrays, Scalar
from torch import nn

from clients.ddp import train_ddp
from core.config import TrainingConfig
from core.data import ArraySplit
from core.evaluation import (
    DEFAULT_BINS,
    DEFAULT_THRESHOLD,
    EVAL_BINS_KEY,
    EVAL_THRESHOLD_KEY,
    EVALUATE_RECEIVED_KEY,
    RECEIVED_EVAL_PREFIX,
    evaluate,
)
from core.models import get_weights, set_weights
from core.training import TrainResult, train
from protections.client_step import (
    ClientPipeline,
    ClientStep,
    RefuseRound,
    RoundContext,
)

# Asked once per node by the server's client manager (app/experiment_server.py), which orders
# nodes by it so that seeded sampling and aggregation order do not depend on node ids (random
# per run). Answered with the node config's partition-id; a node without one leaves it out.
PARTITION_ID_PROPERTY = "partition-id"


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
        steps: Sequence[ClientStep] = (),
        state: Context | None = None,
        wire_names: list[str] | None = None,
    ) -> None:
        self.pipeline = ClientPipeline(steps)
        # Fine-tuning: only these tensors travel and train (None: all); core/finetune.py.
        self.wire_names = wire_names
        self.model = model.to(device)
        self.state_context = state
        self.train_data = train_data
        self.val_data = val_data
        self.task = task
        self.training = training
        self.device = device
        self.seed = seed

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return get_weights(self.model, self.wire_names)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        answers = self.pipeline.properties(config, self.state_context)
        node_config = self.state_context.node_config if self.state_context is not None else {}
        if PARTITION_ID_PROPERTY in config and "partition-id" in node_config:
            answers[PARTITION_ID_PROPERTY] = int(node_config["partition-id"])
        return answers

    def _round(self, config: dict[str, Scalar], fitting: bool) -> RoundContext:
        server_round = int(config.get("server_round", 0))
        training = TrainingConfig(
            **{
                **vars(self.training),
                "local_epochs": int(config.get("local_epochs", self.training.local_epochs)),
                "lr": float(config.get("lr", self.training.lr)),
            }
        )
        return RoundContext(
            config=config,
            fitting=fitting,
            server_round=server_round,
            node=self.state_context,
            model=self.model,
            wire_names=self.wire_names,
            data=self.train_data,
            training=training,
            task=self.task,
            device=self.device,
            seed=self.seed + 7919 * server_round,
        )

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        ctx = self._round(config, fitting=True)
        try:
            parameters = self.pipeline.receive(parameters, ctx)
        except RefuseRound as refusal:
            return [], 0, refusal.metrics
        ctx.global_weights = parameters
        set_weights(self.model, parameters, self.wire_names)
        if config.get(EVALUATE_RECEIVED_KEY):  # strategy.evaluate_with_train: the model as received
            loss, num_examples, metrics = self._evaluate(config)
            ctx.metrics.update({f"{RECEIVED_EVAL_PREFIX}{k}": v for k, v in metrics.items()})
            ctx.metrics[f"{RECEIVED_EVAL_PREFIX}loss"] = loss
            ctx.metrics[f"{RECEIVED_EVAL_PREFIX}num_examples"] = num_examples
        trainer = self.pipeline.trainer
        result = trainer.train(ctx) if trainer is not None else self._train(ctx)
        ctx.metrics.update(
            {"train_loss": result.train_loss, "steps": result.steps, "train_seconds": result.seconds}
        )
        if result.train_accuracy is not None:
            ctx.metrics["train_accuracy"] = result.train_accuracy
        ctx.num_examples = result.num_examples
        weights = self.pipeline.transform(get_weights(self.model, self.wire_names), ctx)
        return weights, ctx.num_examples, ctx.metrics

    def _train(self, ctx: RoundContext) -> TrainResult:
        """The task's own local training: one process, or DDP workers (training.world_size)."""
        local_train = train_ddp if self.training.world_size > 1 else train
        return local_train(
            self.model,
            self.train_data,
            ctx.training,
            self.task,
            self.device,
            seed=ctx.seed,
            proximal_mu=float(ctx.config.get("proximal_mu", 0.0)),  # sent by Flower's FedProx
            max_steps=ctx.max_steps,
        )

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        parameters = self.pipeline.receive(parameters, self._round(config, fitting=False))
        set_weights(self.model, parameters, self.wire_names)
        return self._evaluate(config)

    def _evaluate(self, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """The model as it is now on the validation split: (loss, examples, metrics)."""
        if len(self.val_data) == 0:
            # No validation examples (dataset.val_fraction=0, or a partition under two
            # examples): 0 examples weigh nothing; the strategy drops such results.
            return 0.0, 0, {}
        metrics = evaluate(
            self.model, self.val_data, self.task, self.device,
            # the server's evaluation.* (strategies/factory.py evaluate_config_fn)
            threshold=float(config.get(EVAL_THRESHOLD_KEY, DEFAULT_THRESHOLD)),
            calibration_bins=int(config.get(EVAL_BINS_KEY, DEFAULT_BINS)),
        )  # fmt: skip
        loss = metrics.pop("loss")
        return loss, len(self.val_data), metrics
