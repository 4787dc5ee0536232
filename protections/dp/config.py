"""The `privacy` group's options, one schema each, and their checks (protections/dp/server.py
and protections/dp/dpsgd.py read them).

Each option carries only its own keys, so a key of another mechanism fails at config time
(`privacy=server_fixed privacy.target_quantile=0.9` names adaptive as the option that has it)
instead of being ignored. app/config.py registers :data:`OPTIONS` in Hydra's ConfigStore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.config import (
    ConfigError,
    ExperimentConfig,
    ImageFolderDatasetConfig,
    PrivacyGroupConfig,
    Require,
    TextDatasetConfig,
)

ACCOUNTING = ("auto", "poisson", "without_replacement")
_BUDGET_ON_CLIENTS = "is accounted by each client, so the server cannot stop on a budget"


@dataclass
class DPConfig(PrivacyGroupConfig):
    """The keys every differential-privacy option has."""

    noise_multiplier: float = 1.0  # z: noise std = z * clipping norm (dpsgd: * max_grad_norm)
    target_delta: float = 1e-5
    # Send/record metrics that no accountant covers (train loss, update norms, example counts,
    # clipped counts, federated evaluation on the clients' data). Named in results'
    # privacy.not_covered when on.
    unprotected_metrics: bool = False


@dataclass
class ClientLevelDPConfig(DPConfig):
    """Client-level DP where the server adds the noise and accounts the run.
    privacy=server_fixed: the server clips each update (difference to the global model) to
    clipping_norm, averages uniformly over the sampled clients, adds N(0, (z C / m)^2).
    privacy=client_fixed: each client clips its own update (the server checks the norm and
    rejects larger ones); the server adds the noise as in server_fixed."""

    name: str = "server_fixed"
    clipping_norm: float = 1.0  # C: L2 bound of a client's update (adaptive: initial value)
    epsilon_budget: float | None = None  # stop before a round that would exceed it
    # How clients are sampled and accounted (protections/dp/accounting.py): poisson (each
    # client joins with q = m/N; add/remove neighbours) | without_replacement (exactly m;
    # replace-one neighbours). auto: poisson, or without_replacement under secagg=he.
    accounting: str = "auto"
    # null: noise from the OS CSPRNG (the default). An int makes every noise draw reproducible
    # from the config, i.e. no privacy against anyone who reads it: refused unless forced.
    noise_seed: int | None = None
    allow_reproducible_noise: bool = False  # tests and benchmarks only


@dataclass
class AdaptiveDPConfig(ClientLevelDPConfig):
    """privacy=adaptive: client-level DP with adaptive clipping (Andrew et al. 2021): the
    clipping norm follows the target quantile of update norms, learned from a noised count of
    unclipped clients."""

    name: str = "adaptive"
    noise_multiplier: float = 0.4
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None  # null: sampled clients / 20 (Flower's default)


@dataclass
class LocalDPConfig(DPConfig):
    """privacy=local: each client clips its update to clipping_norm and adds N(0, (z C)^2)
    itself before sending; each client accounts its own epsilon (no amplification by
    sampling). Neighbours: any two data sets of one client (replace-one), so an update's
    sensitivity is 2C."""

    name: str = "local"
    clipping_norm: float = 1.0
    noise_seed: int | None = None  # as in ClientLevelDPConfig: null unless forced
    allow_reproducible_noise: bool = False  # tests and benchmarks only
    misplaced: ClassVar[dict[str, str]] = {
        "epsilon_budget": f"privacy=local {_BUDGET_ON_CLIENTS}",
        "accounting": "privacy=local has no sampling amplification to account: each client "
        "accounts its own releases",
    }


@dataclass
class DPSGDConfig(DPConfig):
    """privacy=dpsgd: sample-level DP; clients train with Opacus DP-SGD (per-sample clipping to
    max_grad_norm, Gaussian noise, Poisson-sampled batches). Each client's RDP accountant
    persists across rounds in its Flower Context. Set target_epsilon to derive the noise from a
    per-client budget."""

    name: str = "dpsgd"
    max_grad_norm: float = 1.0  # per-sample gradient clipping
    # Each example joins a DP-SGD step with this probability (int(1/q) steps per epoch; the
    # noised sum is divided by training.batch_size): public, so nothing released depends on
    # a client's data-set size except through the clipped gradients.
    sample_rate: float = 0.1
    target_epsilon: float | None = None  # per client over the whole run; sets the noise
    misplaced: ClassVar[dict[str, str]] = {
        "epsilon_budget": f"privacy=dpsgd {_BUDGET_ON_CLIENTS}: set privacy.target_epsilon "
        "(per client)",
        "clipping_norm": "DP-SGD clips each example's gradient: set privacy.max_grad_norm",
    }


# privacy=<option> -> its schema (server_fixed and client_fixed share their keys).
OPTIONS: dict[str, object] = {
    "none": PrivacyGroupConfig,
    "server_fixed": ClientLevelDPConfig,
    "client_fixed": ClientLevelDPConfig(name="client_fixed"),
    "adaptive": AdaptiveDPConfig,
    "local": LocalDPConfig,
    "dpsgd": DPSGDConfig,
}


def resolve_accounting(cfg: ExperimentConfig) -> None:
    """`privacy.accounting=auto`: the sampling that the secagg path can run."""
    p = cfg.privacy
    if isinstance(p, ClientLevelDPConfig) and p.accounting == "auto":
        p.accounting = "without_replacement" if cfg.secagg.name == "he" else "poisson"


def check_privacy(cfg: ExperimentConfig, require: Require) -> None:
    """Values of the chosen DP option that have the right type but cannot work."""
    p = cfg.privacy
    if not isinstance(p, DPConfig):
        return
    require(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0 (0: no noise)")
    require(0 < p.target_delta < 1, "privacy.target_delta", "must be in (0, 1), e.g. 1e-5")
    if isinstance(p, (ClientLevelDPConfig, LocalDPConfig)):
        require(p.clipping_norm > 0, "privacy.clipping_norm", "must be > 0")
        require(
            p.noise_seed is None or p.allow_reproducible_noise,
            "privacy.noise_seed",
            "a noise seed in the config makes every noise draw reproducible by whoever reads the "
            "config, which voids the privacy guarantee: leave it null (OS CSPRNG), or force it "
            "for a test or benchmark with privacy.allow_reproducible_noise=true",
        )
        require(
            p.noise_seed is None or p.noise_seed >= 0,
            "privacy.noise_seed",
            "must be >= 0 (or null)",
        )
        n = cfg.simulation.num_supernodes
        require(
            p.target_delta < 1 / n,
            "privacy.target_delta",
            f"client-level DP needs delta < 1/N = 1/{n} clients (simulation.num_supernodes); "
            "delta >= 1/N allows releasing one client's data outright",
        )
    if isinstance(p, ClientLevelDPConfig):
        if p.accounting not in ACCOUNTING:
            raise ConfigError(
                f"Invalid experiment configuration: privacy.accounting={p.accounting!r} is not "
                f"one of {', '.join(ACCOUNTING)}."
            )
        require(
            p.epsilon_budget is None or p.epsilon_budget > 0,
            "privacy.epsilon_budget",
            "must be > 0, or null for no budget",
        )
        require(
            p.epsilon_budget is None or p.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "noise_multiplier=0 releases updates without noise (epsilon = inf), so no round "
            "fits an epsilon_budget: set noise_multiplier > 0 or drop the budget",
        )
        require(
            not (cfg.secagg.name == "he" and p.accounting == "poisson"),
            "privacy.accounting",
            "secagg=he samples a fixed-size cohort (an empty Poisson cohort would need a "
            "ciphertext no client sent): use privacy.accounting=without_replacement or auto",
        )
    if isinstance(p, AdaptiveDPConfig):
        require(0 <= p.target_quantile <= 1, "privacy.target_quantile", "must be in [0, 1]")
        require(p.clip_norm_lr > 0, "privacy.clip_norm_lr", "must be > 0")
        sampled = max(
            cfg.strategy.min_train_clients,
            int(cfg.strategy.fraction_train * cfg.simulation.num_supernodes),
        )
        count_std = p.clipped_count_stddev if p.clipped_count_stddev is not None else sampled / 20
        require(
            p.noise_multiplier < 2 * count_std,
            "privacy.noise_multiplier",
            f"adaptive clipping needs noise_multiplier < 2 * clipped_count_stddev = "
            f"{2 * count_std:g} (default stddev: {sampled} sampled clients / 20); raise "
            "privacy.clipped_count_stddev or sample more clients",
        )
    if isinstance(p, DPSGDConfig):
        require(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0")
        require(
            0 < p.sample_rate <= 1,
            "privacy.sample_rate",
            "must be in (0, 1]: the probability that an example joins a DP-SGD step",
        )
        require(
            p.target_epsilon is None or p.target_epsilon > 0,
            "privacy.target_epsilon",
            "must be > 0, or null to use privacy.noise_multiplier",
        )
        require(
            p.target_epsilon is not None or p.noise_multiplier > 0,
            "privacy.noise_multiplier",
            "DP-SGD needs noise: noise_multiplier > 0 or a target_epsilon",
        )
        require(
            cfg.strategy.name != "fedprox",
            "strategy.name",
            "FedProx's proximal term has no per-sample gradient, so DP-SGD would silently "
            "drop it: use strategy=fedavg|fedavgm|fedadam with privacy=dpsgd",
        )
        if cfg.model.name == "hf":
            check_dpsgd_layers(cfg)


def check_dpsgd_layers(cfg: ExperimentConfig) -> None:
    """model=hf under DP-SGD: every tensor that trains needs an exact per-sample gradient.

    Opacus 1.6 has grad samplers for Linear, Embedding, LayerNorm, the Conv and norm layers and
    RMSNorm (`GradSampleModule.GRAD_SAMPLERS`): the pieces of a BERT-like encoder and of
    peft's LoRA Linear (its lora_A and lora_B are Linear layers). A module of another type that
    owns trainable tensors would go to its torch.func fallback, which peft's LoRA Embedding
    defeats (its adapters are a ParameterDict that the forward reads directly, so no hook
    fires) and which refuses modules with buffers: refused by type. A supported layer can still
    be called on an input every example shares: BERT's position embeddings get a (1, length)
    batch of position ids, so Opacus computes one gradient for the whole batch, not one per
    example, and the client's first step fails. No layer type tells that, so the model is
    probed: one forward and backward of a 2-example batch under Opacus' GradSampleModule, and
    every trainable tensor must come back with 2 per-sample gradients of its shape. Both run
    here, at config time, naming the tensors. A data set whose spec needs the network (hub
    image sets) is checked when a client builds the model."""
    from core.data import data_spec
    from core.finetune import build_finetune_model
    from protections.dp.opacus_import import import_opacus_quietly

    if not (isinstance(cfg.dataset, (TextDatasetConfig, ImageFolderDatasetConfig)) or cfg.dataset.name == "digits"):
        return
    import_opacus_quietly()
    import torch
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import trainable_modules

    spec = data_spec(cfg.dataset)
    model, _ = build_finetune_model(cfg.model, spec)
    refused = [
        f"{name} ({type(module).__module__}.{type(module).__name__})"
        for name, module in trainable_modules(model)
        if type(module) not in GradSampleModule.GRAD_SAMPLERS or list(module.buffers(recurse=False))
    ]
    why = "no per-sample gradients for these layer types"
    if not refused:
        if spec.image_shape is None:  # token id 0 everywhere, attention mask 1 everywhere
            half = spec.num_features // 2
            x = torch.cat([torch.zeros(2, half), torch.ones(2, half)], dim=1).long()
        else:
            x = torch.zeros(2, spec.num_features)
        probe = GradSampleModule(model.train())  # Opacus records activations in training mode
        try:
            probe(x).sum().backward()
        except (RuntimeError, ValueError) as err:  # a layer Opacus' hooks cannot follow
            refused, why = [f"the probe step failed ({err})"], "per-sample gradients failed"
        else:
            refused = [
                name
                for name, p in model.named_parameters()
                if p.requires_grad
                and (getattr(p, "grad_sample", None) is None or tuple(p.grad_sample.shape) != (2, *p.shape))
            ]
            why = "one gradient for the whole batch, not one per example (a layer called on an input all examples share, such as position embeddings)"
        finally:
            probe._close()
    if refused:
        raise ConfigError(
            "Invalid experiment configuration: privacy=dpsgd: Opacus computes per-sample "
            "gradients of Linear, Embedding, LayerNorm, Conv and norm layers (and peft's LoRA "
            f"Linear adapters) applied per example; {why}: {', '.join(refused[:5])}"
            f"{' and more' if len(refused) > 5 else ''}. Train other tensors (model.trainable=head, "
            "with LoRA adapters on Linear layers: model.lora.target), or use a client-level privacy= option"
        )
