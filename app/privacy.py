"""DP pieces both sides share: the fit-config keys of the server/client protocol, update
clipping, noise sources, and the local-DP accountant of one client.

Server code (strategies/) and client code (clients/) both import this module and never each
other, like Flower's DP wrappers and mods reading their keys from one constants module.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np

# Fit-config keys the server sends and clients read.
CLIP_NORM_KEY = "dp_clipping_norm"  # clients clip their update to this L2 norm
LOCAL_NOISE_KEY = "dp_local_noise_multiplier"  # clients add N(0, (z C)^2) themselves
# Fit-metric keys clients report.
EPSILON_METRIC = "epsilon"  # the client's own epsilon so far (local DP, DP-SGD)
UPDATE_NORM_METRIC = "update_norm"  # L2 norm of the update before clipping


class NormalSource(Protocol):
    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray: ...


class SecureGaussian:
    """Gaussian noise from the OS CSPRNG (`os.urandom`) by the Box-Muller transform.

    NumPy's generators are fast but predictable from their state; this is the production
    choice, like Opacus' `secure_mode` (which needs torchcsprng). As there, the floating-point
    attacks on the Gaussian's tails (Mironov 2012) are not addressed.
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


def make_noise_source(seed: int | None, secure: bool) -> NormalSource:
    """CSPRNG in secure mode; else NumPy's generator, seeded (tests) or from OS entropy."""
    return SecureGaussian() if secure else np.random.default_rng(seed)


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


def local_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of a client that released `releases` clipped updates, each with its own
    N(0, (z C)^2) noise (local DP: no amplification by sampling, since the client knows it
    took part). Flower's RdpAccountant composes the releases."""
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
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), count=releases)
    return accountant.get_epsilon(delta)
