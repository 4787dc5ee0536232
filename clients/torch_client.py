"""The NumPyClient every SuperNode runs: receive the global model, train locally, report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.client import NumPyClient
from flwr.common import ConfigRecord, Context, NDArrays, Scalar
from torch import nn

from app.config import PrivacyConfig, TrainingConfig
from app.data import ArraySplit
from app.evaluation import evaluate
from app.models import get_weights, set_weights
from app.privacy import (
    CLIP_NORM_KEY,
    EPSILON_METRIC,
    LOCAL_NOISE_KEY,
    UPDATE_NORM_METRIC,
    clip_update,
    l2_norm,
    local_dp_epsilon,
    make_noise_source,
)
from clients.dpsgd import HISTORY_KEY, train_dpsgd
from clients.training import train

# Context.state keys: a client's privacy history survives between rounds there.
LOCAL_DP_STATE = "local_dp"
DPSGD_STATE = "dpsgd_accountant"


@dataclass(frozen=True)
class FitInstructions:
    """What the server asks of this round, parsed once at the edge of `fit`."""

    server_round: int
    local_epochs: int
    lr: float
    proximal_mu: float
    clipping_norm: float | None  # client-side clipping (privacy=client_fixed | local)
    local_noise_multiplier: float | None  # local DP noise (privacy=local)

    @classmethod
    def from_config(cls, config: dict[str, Scalar], defaults: TrainingConfig) -> FitInstructions:
        return cls(
            server_round=int(config.get("server_round", 0)),
            local_epochs=int(config.get("local_epochs", defaults.local_epochs)),
            lr=float(config.get("lr", defaults.lr)),
            proximal_mu=float(config.get("proximal_mu", 0.0)),  # sent by Flower's FedProx
            clipping_norm=_optional_float(config.get(CLIP_NORM_KEY)),
            local_noise_multiplier=_optional_float(config.get(LOCAL_NOISE_KEY)),
        )


def _optional_float(value: Scalar | None) -> float | None:
    return None if value is None else float(value)


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
        privacy: PrivacyConfig | None = None,
        state: Context | None = None,
        max_rounds: int = 1,
    ) -> None:
        self.model = model.to(device)
        self.privacy = privacy if privacy is not None else PrivacyConfig()
        self.state_context = state
        self.max_rounds = max_rounds
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
        seed = self.seed + 7919 * ins.server_round
        metrics: dict[str, Scalar] = {}
        if self.privacy.name == "dpsgd":
            result, epsilon = self._train_dpsgd(training, seed)
            metrics[EPSILON_METRIC] = epsilon
        else:
            result = train(
                self.model,
                self.train_data,
                training,
                self.task,
                self.device,
                seed=seed,
                proximal_mu=ins.proximal_mu,
            )
        weights = get_weights(self.model)
        if ins.clipping_norm is not None:
            weights, update_metrics = self._bound_update(parameters, weights, ins, seed)
            metrics.update(update_metrics)
        metrics.update({"train_loss": result.train_loss, "steps": result.steps})
        if result.train_accuracy is not None:
            metrics["train_accuracy"] = result.train_accuracy
        return weights, result.num_examples, metrics

    def _bound_update(self, sent: NDArrays, trained: NDArrays, ins: FitInstructions, seed: int):
        """Client-side clipping (and, for local DP, this client's own noise) of its update."""
        update = [t - s for t, s in zip(trained, sent)]
        metrics: dict[str, Scalar] = {UPDATE_NORM_METRIC: l2_norm(update)}
        update, _ = clip_update(update, ins.clipping_norm)
        if ins.local_noise_multiplier is not None:
            noise_seed = self.privacy.noise_seed
            noise = make_noise_source(
                None if noise_seed is None else noise_seed * 1_000_003 + seed,
                self.privacy.secure_noise,
            )
            std = ins.local_noise_multiplier * ins.clipping_norm
            update = [(u + noise.normal(0.0, std, u.shape)).astype(u.dtype) for u in update]
            releases = self._bump_local_releases()
            metrics[EPSILON_METRIC] = local_dp_epsilon(
                ins.local_noise_multiplier, releases, self.privacy.target_delta
            )
        return [s + u for s, u in zip(sent, update)], metrics

    def _bump_local_releases(self) -> int:
        if self.state_context is None:
            raise RuntimeError("local DP accounting needs the client's Context")
        state = self.state_context.state
        releases = int(state[LOCAL_DP_STATE]["releases"]) + 1 if LOCAL_DP_STATE in state else 1
        state[LOCAL_DP_STATE] = ConfigRecord({"releases": releases})
        return releases

    def _train_dpsgd(self, training: TrainingConfig, seed: int):
        if self.state_context is None:
            raise RuntimeError("DP-SGD accounting needs the client's Context")
        state = self.state_context.state
        history = str(state[DPSGD_STATE][HISTORY_KEY]) if DPSGD_STATE in state else "[]"
        result, epsilon, history = train_dpsgd(
            self.model,
            self.train_data,
            training,
            self.privacy,
            self.task,
            self.device,
            seed,
            history,
            self.max_rounds,
        )
        state[DPSGD_STATE] = ConfigRecord({HISTORY_KEY: history})
        return result, epsilon

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        set_weights(self.model, parameters)
        metrics = evaluate(self.model, self.val_data, self.task, self.device)
        loss = metrics.pop("loss")
        return loss, len(self.val_data), metrics
