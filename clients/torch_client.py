"""The NumPyClient every SuperNode runs: receive the global model, train locally, report."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import ConfigRecord, Context, NDArrays, Scalar
from torch import nn

from protections.compression.wire import COMPRESSION_KEY, compress_update
from core.config import PrivacyConfig, TrainingConfig
from core.data import ArraySplit
from core.evaluation import evaluate
from protections.he.context import (
    HE_MASK_PEERS_KEY,
    HE_MASK_PK_PROPERTY,
    MASK_STATE,
    layout_hash,
    mask_keypair,
    pairwise_mask,
    HE_ROUND_KEY,
    HE_SECRET_PATH_KEY,
    HE_WEIGHTING_KEY,
    NODE_SECRET_CONTEXT,
    HEContext,
    HEError,
    is_payload,
    load_context,
)
from core.models import get_weights, set_weights
from protections.workload.wire import COMPUTE_METRIC, FULL_STEPS_METRIC, WORKLOAD_KEY, full_local_steps, scaled_steps
from protections.dp.mechanisms import (
    CLIP_NORM_KEY,
    EPSILON_METRIC,
    LOCAL_NOISE_KEY,
    UPDATE_NORM_METRIC,
    clip_update,
    l2_norm,
    local_dp_epsilon,
    local_dp_release,
    make_noise_source,
)
from protections.he.client import (
    BAD_AGGREGATE_METRIC,
    BadAggregate,
    decrypt_model,
    encrypt_update,
    rounding_slack,
)
from clients.ddp import train_ddp
from core.training import train

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
    he_round: int | None  # secagg=he: encrypt the result, tagged with this round
    he_uniform_weight: bool  # secagg=he: weight 1 (client-level DP) instead of num_examples
    compression: str | None = None  # fp16 | int8: return the quantized update (protections/compression/wire.py)
    workload: str = "uniform"  # capability: scale local steps to this node's compute

    @classmethod
    def from_config(cls, config: dict[str, Scalar], defaults: TrainingConfig) -> FitInstructions:
        return cls(
            server_round=int(config.get("server_round", 0)),
            local_epochs=int(config.get("local_epochs", defaults.local_epochs)),
            lr=float(config.get("lr", defaults.lr)),
            proximal_mu=float(config.get("proximal_mu", 0.0)),  # sent by Flower's FedProx
            clipping_norm=_optional_float(config.get(CLIP_NORM_KEY)),
            local_noise_multiplier=_optional_float(config.get(LOCAL_NOISE_KEY)),
            he_round=None if HE_ROUND_KEY not in config else int(config[HE_ROUND_KEY]),
            he_uniform_weight=config.get(HE_WEIGHTING_KEY) == "uniform",
            compression=None if COMPRESSION_KEY not in config else str(config[COMPRESSION_KEY]),
            workload=str(config.get(WORKLOAD_KEY, "uniform")),
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
        he_secret_context: str | None = None,
        wire_names: list[str] | None = None,
        compute: float = 1.0,
    ) -> None:
        self.compute = compute  # capability in (0, 1] (protections/workload/wire.py)
        # Fine-tuning: only these tensors travel and train (None: all); core/finetune.py.
        self.wire_names = wire_names
        self.he_secret_context = he_secret_context  # node config path (deployment)
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
        return get_weights(self.model, self.wire_names)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        ins = FitInstructions.from_config(config, self.training)
        he = self._he_context(config) if ins.he_round is not None else None
        try:
            parameters = self._plaintext(parameters, he)
        except BadAggregate as err:
            # The global model fails this key holder's check (tampered, overflowed, a weight
            # lie): train nothing, tell the server, which rolls back when most clients agree.
            return [], 0, {BAD_AGGREGATE_METRIC: str(err)}
        set_weights(self.model, parameters, self.wire_names)
        training = TrainingConfig(
            **{**vars(self.training), "local_epochs": ins.local_epochs, "lr": ins.lr}
        )
        seed = self.seed + 7919 * ins.server_round
        metrics: dict[str, Scalar] = {}
        if self.privacy.name == "dpsgd":
            result, epsilon = self._train_dpsgd(training, seed)
            metrics[EPSILON_METRIC] = epsilon
        else:
            full_steps = full_local_steps(
                len(self.train_data), training.local_epochs, training.batch_size
            )
            scaled = ins.workload == "capability"
            local_train = train_ddp if self.training.world_size > 1 else train
            result = local_train(
                self.model,
                self.train_data,
                training,
                self.task,
                self.device,
                seed=seed,
                proximal_mu=ins.proximal_mu,
                max_steps=scaled_steps(full_steps, self.compute) if scaled else None,
            )
            metrics.update({COMPUTE_METRIC: self.compute, FULL_STEPS_METRIC: full_steps})
        weights = get_weights(self.model, self.wire_names)
        if ins.clipping_norm is not None:
            if he is not None:
                ins = replace(ins, clipping_norm=self._he_clip_norm(ins.clipping_norm, he))
            weights, update_metrics = self._bound_update(parameters, weights, ins, seed)
            metrics.update(update_metrics)
        metrics.update(
            {"train_loss": result.train_loss, "steps": result.steps, "train_seconds": result.seconds}
        )
        if result.train_accuracy is not None:
            metrics["train_accuracy"] = result.train_accuracy
        num_examples = result.num_examples
        if self.protected:
            # Only what an accountant covers leaves the client: its epsilon. Loss, accuracy,
            # update norm, step counts and the example count (the FedAvg weight, which under
            # add/remove neighbours reveals membership by itself) stay here; the mean over
            # clients is uniform. privacy.unprotected_metrics=true sends them (not covered).
            metrics = {k: v for k, v in metrics.items() if k == EPSILON_METRIC}
            num_examples = 1
        if he is not None:
            weight = 1 if ins.he_uniform_weight or self.protected else result.num_examples
            mask = self._he_mask(he, config, weights, ins.he_round)
            weights = encrypt_update(he, weights, weight, ins.he_round, mask=mask)
        elif ins.compression is not None:
            weights = compress_update(parameters, weights, ins.compression, np.random.default_rng(seed))
        return weights, num_examples, metrics

    @property
    def protected(self) -> bool:
        """Under any privacy mode, send nothing unaccounted unless the user opted in."""
        return self.privacy.name != "none" and not self.privacy.unprotected_metrics

    # ------------------------------------------------------------------ secagg=he
    def _he_context(self, config: dict[str, Scalar]) -> HEContext:
        """This node's secret context: its node config path (deployment), else the path the
        simulation run provisioned its keys at."""
        path = self.he_secret_context or config.get(HE_SECRET_PATH_KEY)
        if not path:
            raise HEError(
                "secagg=he needs this node's secret context: start the SuperNode with "
                f"--node-config '{NODE_SECRET_CONTEXT}=/path/to/secret.ctx ...'"
            )
        ctx = load_context(str(path))
        if not ctx.is_secret:
            raise HEError(f"{path} is a public context: SuperNodes need the secret one")
        return ctx

    def _mask_key(self):
        """This node's X25519 key pair for pairwise masks, kept in its Flower context state
        (created on first use)."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if self.state_context is None:
            raise HEError("pairwise masks need the client's Context (its key lives there)")
        state = self.state_context.state
        if MASK_STATE in state:
            private = X25519PrivateKey.from_private_bytes(bytes.fromhex(str(state[MASK_STATE]["key"])))
        else:
            private, _ = mask_keypair()
            raw = private.private_bytes_raw()
            state[MASK_STATE] = ConfigRecord({"key": raw.hex()})
        return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        if HE_MASK_PK_PROPERTY in config:
            return {HE_MASK_PK_PROPERTY: self._mask_key()[1].hex()}
        return {}

    def _he_mask(self, he: HEContext, config: dict[str, Scalar], weights: NDArrays, he_round: int):
        """The sum of this node's pairwise masks with the cohort the server named, or None
        when the server asks for none (secagg.pairwise_masks=false)."""
        if HE_MASK_PEERS_KEY not in config:
            return None
        import json

        peers = [bytes.fromhex(p) for p in json.loads(str(config[HE_MASK_PEERS_KEY]))]
        private, public = self._mask_key()
        if public not in peers or len(set(peers)) != len(peers) or len(peers) < 2:
            raise HEError(
                "the server's pairwise-mask cohort omits this node, repeats a key or has one "
                "member: refusing to send an unmasked update"
            )
        layout = layout_hash([np.shape(a) for a in weights])
        count = sum(int(np.size(a)) for a in weights) + 1
        return pairwise_mask(he, private, public, peers, he_round, layout, count)

    def _plaintext(self, parameters: NDArrays, he: HEContext | None) -> NDArrays:
        """The global model in the clear: decrypted (float64, so the update this client
        encrypts is measured from the exact global model) or as received."""
        if not is_payload(parameters):
            return parameters
        if he is None:
            raise HEError("received an encrypted model without secagg=he instructions")
        shapes = [a.shape for a in get_weights(self.model, self.wire_names)]
        # Under client-level DP the server adds noise to the encrypted sum: expected here.
        return decrypt_model(he, parameters, shapes, allow_noise=self.privacy.name == "client_fixed")

    def _he_clip_norm(self, clipping_norm: float, he: HEContext) -> float:
        """Clip to C minus what fixed-point rounding can add, so the encrypted update's
        norm stays <= C (the server cannot check it under HE)."""
        num_values = sum(a.size for a in get_weights(self.model, self.wire_names))
        clip = clipping_norm - rounding_slack(num_values, he.params.scale)
        if clip <= 0:
            raise HEError(
                f"privacy.clipping_norm={clipping_norm} is below the fixed-point rounding "
                f"slack of {num_values} encrypted values: raise secagg.scale_bits"
            )
        return clip

    def _bound_update(self, sent: NDArrays, trained: NDArrays, ins: FitInstructions, seed: int):
        """Client-side clipping (and, for local DP, this client's own noise) of its update."""
        update = [t - s for t, s in zip(trained, sent)]
        metrics: dict[str, Scalar] = {UPDATE_NORM_METRIC: l2_norm(update)}
        if ins.local_noise_multiplier is None:
            update, _ = clip_update(update, ins.clipping_norm)
        else:
            noise_seed = self.privacy.noise_seed  # refused by config unless forced
            noise = make_noise_source(None if noise_seed is None else noise_seed * 1_000_003 + seed)
            update = local_dp_release(update, ins.clipping_norm, ins.local_noise_multiplier, noise)
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
        # Imported here: Opacus takes about 1.2 s to import, which every client process (each
        # simulation's Ray actors) would otherwise pay at start, DP-SGD or not.
        from protections.dp.dpsgd import HISTORY_KEY, train_dpsgd

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
        if self.protected:
            raise PermissionError(
                f"federated evaluation under privacy={self.privacy.name} would send loss and "
                "accuracy on this client's data, which no accountant covers: the server does "
                "not ask for it unless privacy.unprotected_metrics=true"
            )
        if is_payload(parameters):
            parameters = self._plaintext(parameters, self._he_context(config))
        if len(self.val_data) == 0:
            # No validation examples (dataset.val_fraction=0, or a partition under two
            # examples): 0 examples weigh nothing; the strategy drops such results.
            return 0.0, 0, {}
        set_weights(self.model, parameters, self.wire_names)
        metrics = evaluate(self.model, self.val_data, self.task, self.device)
        loss = metrics.pop("loss")
        return loss, len(self.val_data), metrics
