"""The client half of a protection as one step of an ordered pipeline.

The server stacks one `StrategyWrapper` per protection (protections/base.py, assembled in
strategies/factory.py). The client mirrors it with one `ClientStep` per protection, assembled
in one place (clients/pipeline.py, which draws both orders side by side) and applied by
`clients.torch_client.TorchClient`, which itself knows no protection.

A step overrides only what its protection changes, and reads only its own fit-config keys
(the instructions its server half sends):

- `receive(parameters, ctx)`: the global model on its way in, before training or evaluation
  (HE decrypts it; the DP release step refuses an evaluation it cannot account for);
- `train(ctx)`: the one step with `replaces_training = True` trains instead of the task's
  own local training (DP-SGD);
- `transform(weights, ctx)`: the trained model on its way out (clip and noise, encrypt,
  compress, keep back what no accountant covers);
- `properties(config, node)`: answers to the server's `get_properties` (HE's mask key).

`receive` runs from the wire inwards (the reverse of the pipeline's order) and `transform`
from training outwards (the pipeline's order), so a step that wraps the wire format (HE)
undoes it first and applies it last, as a strategy wrapper does on the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.common import Context, NDArrays, RecordDict, Scalar
from torch import nn

from core.config import TrainingConfig
from core.data import ArraySplit
from core.models import get_weights
from core.training import TrainResult


class RefuseRound(Exception):
    """A step's `receive` refuses to train on what the server sent (an HE aggregate that fails
    its check): `fit` returns no update, 0 examples and these metrics, which tell the server."""

    def __init__(self, message: str, metrics: dict[str, Scalar]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass(frozen=True)
class ClipSlack:
    """L2 norm a later step may add to the update after clipping (HE's fixed-point
    rounding), and why: the clipping step clips to C minus `norm` so the update that
    finally leaves stays within C."""

    norm: float
    why: str


@dataclass
class RoundContext:
    """One `fit` or `evaluate` call of one client, shared by its steps."""

    config: dict[str, Scalar]  # the server's instructions as received
    fitting: bool  # fit (True) or evaluate (False)
    server_round: int
    node: Context | None  # the node's Flower Context: what survives between rounds
    model: nn.Module
    wire_names: list[str] | None  # the tensors that travel (core/finetune.py); None: all
    data: ArraySplit  # the training split
    training: TrainingConfig  # this round's, with the instructed local_epochs and lr
    task: str
    device: torch.device
    seed: int  # this round's public seed (never one privacy depends on, protections/dp/dpsgd.py)
    global_weights: NDArrays | None = None  # the global model in the clear, after `receive`
    max_steps: int | None = None  # a local step budget (protections/workload/client.py)
    clip_slack: ClipSlack | None = None
    metrics: dict[str, Scalar] = field(default_factory=dict)
    num_examples: int = 0  # the aggregation weight reported with the update
    carry: dict[str, Any] = field(default_factory=dict)  # a step's own per-round values

    def local_shapes(self) -> list[tuple[int, ...]]:
        return [a.shape for a in get_weights(self.model, self.wire_names)]

    def node_state(self, needed_by: str) -> RecordDict:
        """The node's persistent state (Flower keeps Context.state between messages; the
        client object itself is rebuilt for each one)."""
        if self.node is None:
            raise RuntimeError(f"{needed_by} needs the client's Context")
        return self.node.state


class ClientStep:
    """One protection's client half; every hook passes through unless overridden."""

    replaces_training: ClassVar[bool] = False

    def receive(self, parameters: NDArrays, ctx: RoundContext) -> NDArrays:
        return parameters

    def train(self, ctx: RoundContext) -> TrainResult:
        raise NotImplementedError(f"{type(self).__name__} does not replace training")

    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        return weights

    def properties(self, config: dict[str, Scalar], node: Context | None) -> dict[str, Scalar]:
        return {}

    def __repr__(self) -> str:
        return type(self).__name__


class ClientPipeline:
    """Steps in the order an outgoing update passes them (training first, wire last)."""

    def __init__(self, steps: Sequence[ClientStep]) -> None:
        self.steps = tuple(steps)
        trainers = [s for s in self.steps if s.replaces_training]
        if len(trainers) > 1:
            raise ValueError(f"two steps replace local training: {trainers}")
        self.trainer = trainers[0] if trainers else None

    def __repr__(self) -> str:
        return f"ClientPipeline({', '.join(map(repr, self.steps))})"

    def receive(self, parameters: NDArrays, ctx: RoundContext) -> NDArrays:
        for step in reversed(self.steps):
            parameters = step.receive(parameters, ctx)
        return parameters

    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        for step in self.steps:
            weights = step.transform(weights, ctx)
        return weights

    def properties(self, config: dict[str, Scalar], node: Context | None) -> dict[str, Scalar]:
        answers: dict[str, Scalar] = {}
        for step in self.steps:
            answers.update(step.properties(config, node))
        return answers
