"""The `secagg=he` option's schema and checks: BFV homomorphic encryption (TenSEAL's SEAL API),
the server adds ciphertexts it cannot decrypt.

The encryption parameters' defaults are :class:`protections.he.context.HEParams`' (written once
there; protections/he/context.py says why each value): this schema copies them, and
:func:`he_params` turns the config back into the `HEParams` every party shares. app/config.py
registers :data:`OPTIONS` in Hydra's ConfigStore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.config import (
    ConfigError,
    ExperimentConfig,
    LocalDatasetConfig,
    Require,
    SecAggConfig,
    TextDatasetConfig,
)
from core.data import data_spec
from core.finetune import build_finetune_model
from protections.he.context import HEError, HEParams

_PARAMS = HEParams()


@dataclass
class HESecAggConfig(SecAggConfig):
    """secagg=he: clients encrypt their pre-weighted models, the server adds ciphertexts it
    cannot decrypt, clients decrypt the sum. 128-bit security (SEAL checks it); 7.6 bytes per
    parameter up, 15.1 down."""

    name: str = "he"
    poly_modulus_degree: int = _PARAMS.poly_modulus_degree  # N: values per ciphertext
    coeff_mod_bit_sizes: list[int] = field(
        default_factory=lambda: list(_PARAMS.coeff_mod_bit_sizes)  # one prime suffices
    )
    plain_modulus_bits: int = _PARAMS.plain_modulus_bits  # t: holds the sum of quantized values
    scale_bits: int = _PARAMS.scale_bits  # fixed-point scale: weighted-mean error <= 0.5 / 2^bits
    max_abs_value: float = _PARAMS.max_abs_value  # clients refuse to encrypt a value beyond this
    # The most one client may weigh (its example count under FedAvg); a claim above it rejects
    # that client (recorded in results.json), the round goes on. 100,000 x 10 clients fits the
    # default plaintext modulus (2^20 in total).
    max_weight: int = 100_000
    # Collusion resistance: clients add pairwise masks (X25519 + ChaCha20) that cancel in the
    # sum and a self mask, so a key holder colluding with the server sees one client's update
    # only as uniform noise mod t; dropout recovery by t-of-n Shamir shares (SecAgg's double
    # masking, protections/he/masks.py): two get_properties round trips before fit, one after.
    pairwise_masks: bool = True
    # The Shamir threshold: 0 = ceil(2n/3) of each round's cohort of n; never at or below n/2
    # (the server raises it to n//2 + 1). A round with fewer survivors fails, recorded.
    mask_threshold: int = 0
    # Deployment: the server's public context file (no secret key). null: the run provisions
    # fresh keys into <output_dir>/keys (simulation). SuperNodes name their secret context in
    # their node config (he-secret-context=/path/secret.ctx).
    public_context: str | None = None


# secagg=<option> -> its schema.
OPTIONS: dict[str, object] = {"none": SecAggConfig, "he": HESecAggConfig}


def he_params(cfg: ExperimentConfig) -> HEParams:
    """The `secagg=he` group as the HE parameters every party shares."""
    s = cfg.secagg
    if not isinstance(s, HESecAggConfig):
        raise ConfigError(f"secagg={s.name} has no HE parameters: use secagg=he")
    return HEParams(
        poly_modulus_degree=s.poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(s.coeff_mod_bit_sizes),
        plain_modulus_bits=s.plain_modulus_bits,
        scale_bits=s.scale_bits,
        max_abs_value=s.max_abs_value,
    )


def check_secagg(cfg: ExperimentConfig, require: Require) -> None:
    """Combinations the encrypted path cannot run, and parameters SEAL or the plaintext
    modulus would refuse (the fixed-point slack needs the model's size: built here)."""
    s = cfg.secagg
    if not isinstance(s, HESecAggConfig):
        return
    require(
        cfg.strategy.name in ("fedavg", "fedprox"),
        "strategy.name",
        "under secagg=he the server only adds ciphertexts, so server optimizers "
        "(fedavgm, fedadam) that need the plaintext aggregate cannot run: use "
        "strategy=fedavg or strategy=fedprox",
    )
    require(
        cfg.privacy.name in ("none", "client_fixed", "local", "dpsgd"),
        "privacy.name",
        "under secagg=he the server cannot see updates, so it cannot clip them: use "
        "privacy=client_fixed (clients clip, the server adds noise to the encrypted sum), "
        "privacy=local or privacy=dpsgd",
    )
    require(s.scale_bits >= 1, "secagg.scale_bits", "must be >= 1")
    require(s.max_abs_value > 0, "secagg.max_abs_value", "must be > 0")
    require(s.max_weight >= 1, "secagg.max_weight", "must be >= 1")
    require(
        s.mask_threshold == 0 or 2 <= s.mask_threshold <= cfg.strategy.min_train_clients,
        "secagg.mask_threshold",
        f"{s.mask_threshold}: use 0 (ceil(2n/3) of each cohort) or a number in [2, "
        f"strategy.min_train_clients={cfg.strategy.min_train_clients}] (a smaller cohort could "
        "never be unmasked)",
    )
    params = he_params(cfg)
    try:
        params.seal_parameters()
        params.check_range()
    except HEError as err:
        raise ConfigError(f"Invalid experiment configuration: {err}") from err
    t = 2 ** (params.plain_modulus_bits - 1)  # t > 2^(bits-1): a lower bound on what fits
    most = params.max_total_weight(2 * t)
    require(
        s.max_weight <= most,
        "secagg.max_weight",
        f"{s.max_weight} exceeds {most}, the total weight the plaintext modulus holds "
        "at these settings: lower it or raise secagg.plain_modulus_bits",
    )
    if cfg.privacy.name == "client_fixed" and isinstance(cfg.dataset, (LocalDatasetConfig, TextDatasetConfig)):
        # the values that are encrypted: the wire (core/finetune.py), not the whole model
        # (under LoRA or model=hf a small part of it)
        model, wire = build_finetune_model(cfg.model, data_spec(cfg.dataset))
        state = model.state_dict()
        d = sum(state[name].numel() for name in wire)
        slack = 0.5 * math.sqrt(d) / params.scale
        clipping_norm = cfg.privacy.clipping_norm  # a key of privacy=client_fixed
        require(
            slack < 0.5 * clipping_norm,
            "secagg.scale_bits",
            f"the fixed-point rounding of {d} encrypted values can add up to {slack:.4g} "
            f"to an update's norm, too much for privacy.clipping_norm={clipping_norm}: "
            "raise secagg.scale_bits",
        )
