"""DP pieces both sides share: the fit-config keys of the server/client protocol, update
clipping, noise sources, and the local-DP accountant of one client.

Server code (strategies/) and client code (clients/) both import this module and never each
other, like Flower's DP wrappers and mods reading their keys from one constants module.
"""

from __future__ import annotations

import math
import os
from typing import Any

from protections.base import NormalSource

import numpy as np

# Fit-config keys the server sends and clients read.
CLIP_NORM_KEY = "dp_clipping_norm"  # clients clip their update to this L2 norm
LOCAL_NOISE_KEY = "dp_local_noise_multiplier"  # clients add N(0, (z C)^2) themselves
# Fit-metric keys clients report.
EPSILON_METRIC = "epsilon"  # the client's own epsilon so far (local DP, DP-SGD)
UPDATE_NORM_METRIC = "update_norm"  # L2 norm of the update before clipping


class SecureGaussian:
    """Gaussian noise from the OS CSPRNG (`os.urandom`) by the Box-Muller transform.

    The default noise source of every DP mechanism here. NumPy's generators are fast but
    predictable from their state (and a seed in a config is known to everyone who reads it),
    so they are used only when a test or benchmark asks for reproducible noise
    (`privacy.noise_seed` with `privacy.allow_reproducible_noise=true`). Written here because
    neither NumPy nor `cryptography` offers Gaussian draws from a CSPRNG, and Opacus' secure
    mode needs torchcsprng, which is not published for this torch. As there, the
    floating-point attacks on the Gaussian's tails (Mironov 2012) are not addressed.
    """

    def normal(self, loc: float, scale: float, size: Any = ()) -> np.ndarray:
        shape = tuple(np.atleast_1d(size)) if size != () else ()
        n = int(np.prod(shape)) if shape else 1
        half = (n + 1) // 2
        u = self._uniform(2 * half).reshape(2, half)
        radius = np.sqrt(-2.0 * np.log(u[0]))
        angle = 2.0 * np.pi * u[1]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return (loc + scale * z).reshape(shape)

    @staticmethod
    def _uniform(n: int) -> np.ndarray:
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return (bits.astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1], so log() is finite


def make_noise_source(seed: int | None) -> NormalSource:
    """The OS CSPRNG; a seeded NumPy generator only when a seed is given (tests and
    benchmarks: config validation refuses a seed unless reproducible noise is forced)."""
    return SecureGaussian() if seed is None else np.random.default_rng(seed)


def l2_norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def clip_update(update: list[np.ndarray], clipping_norm: float) -> tuple[list[np.ndarray], bool]:
    """Scale `update` to L2 norm <= C; returns (clipped copy, whether it was scaled).

    An update under C, the zero update included, passes unchanged (its norm is never divided by).
    """
    norm = l2_norm(update)
    if norm <= clipping_norm:
        return [np.array(a, copy=True) for a in update], False
    scale = clipping_norm / norm
    return [(a * scale).astype(a.dtype) for a in update], True


def local_dp_release(
    update: list[np.ndarray], clipping_norm: float, noise_multiplier: float, noise: NormalSource
) -> list[np.ndarray]:
    """What a local-DP client sends: its update clipped to C plus its own N(0, (z C)^2)."""
    clipped, _ = clip_update(update, clipping_norm)
    std = noise_multiplier * clipping_norm
    return [(u + noise.normal(0.0, std, u.shape)).astype(u.dtype) for u in clipped]


def local_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """RDP epsilon of a client that released `releases` clipped updates, each with its own
    N(0, (z C)^2) noise. Local DP protects any two inputs of the client (replace-one: its
    whole data set for another), whose clipped updates can differ by 2C, so each release is a
    Gaussian of multiplier z/2 per unit sensitivity; no amplification by sampling, since the
    client knows it took part. Flower's RdpAccountant composes the releases."""
    if releases == 0:
        return 0.0
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            # Flower accepts no-amplification only with this label; the relation's effect is
            # the sensitivity, carried by z/2 (a Gaussian's RDP depends on sensitivity/std).
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier / 2, 1, 1), count=releases)
    return accountant.get_epsilon(delta)


def pld_epsilon(events: list[tuple[float, float, int]], delta: float, relation: str) -> float:
    """dp-accounting's PLD epsilon of `events`, each (q, z, count): count Poisson-sampled
    Gaussians of multiplier z (q = 1: no sampling). `relation` is add_or_remove_one or
    replace_one; the PLD accountant applies the replace-one sensitivity of 2 itself."""
    import dp_accounting
    from dp_accounting import pld
    from dp_accounting.privacy_accountant import NeighboringRelation as Relation

    accountant = pld.PLDAccountant(
        neighboring_relation=getattr(Relation, relation.upper()),
        value_discretization_interval=1e-3,
    )
    for q, z, count in events:
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))
