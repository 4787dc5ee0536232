"""Client-level privacy accounting: (epsilon, delta) after every round, and the budget check.

No RDP formula is written here: Flower 1.41's `RdpAccountant` (a wrapper over Google's
dp-accounting, installed with `flwr[dp]`) composes one sampled Gaussian event per private
release. What we add is the bookkeeping our strategies need: several releases per round (the
adaptive variant also releases a noised count), a prospective check that never mutates the
committed state, and the report that goes into results.json.

Sampling assumption. Flower's `ClientManager.sample` draws exactly m of the N available clients
uniformly without replacement. The accountant offers two matching models:
- `poisson` (default, with add-or-remove-one neighbours): each client takes part independently
  with q = m/N. This is the analysis of DP-FedAvg (McMahan et al. 2018) and the tightest one in
  dp-accounting, but it describes Poisson sampling, which Flower does not do: the reported
  epsilon is the standard approximation, not a proof about fixed-size sampling.
- `without_replacement` (with replace-one neighbours): exactly Flower's fixed-size sampling.
  Replace-one neighbours protect a client's data being swapped for someone else's, which costs
  about twice the noise of add-or-remove-one for the same epsilon.
Both assume every one of the N clients is available in every round; clients that drop out or a
population that changes are not modelled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)


class _DropNonConvergedOrders(logging.Filter):
    """dp-accounting logs one warning per RDP order whose series did not converge (frequent
    for q >= 0.5), on every composition. Those orders are left out of the minimum over orders,
    which can only make the reported epsilon larger, never smaller: drop the flood."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergedOrders())

SAMPLING_MODELS = {
    "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE),
    "without_replacement": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE),
}


@dataclass(frozen=True)
class Release:
    """One Gaussian release per round: noise std = noise_multiplier * sensitivity."""

    noise_multiplier: float
    name: str = "update"


class ClientLevelAccountant:
    def __init__(
        self,
        population_size: int,
        sample_size: int,
        target_delta: float,
        sampling: str = "poisson",
        epsilon_budget: float | None = None,
    ) -> None:
        if sampling not in SAMPLING_MODELS:
            raise ValueError(f"sampling={sampling!r}: use {' or '.join(SAMPLING_MODELS)}")
        if not 0 < sample_size <= population_size:
            raise ValueError(
                f"{sample_size} clients sampled per round out of {population_size}: "
                "need 0 < sampled <= population"
            )
        method, relation = SAMPLING_MODELS[sampling]
        self.config = PrivacyConfig(
            target_delta=target_delta,
            population_size=population_size,
            neighboring_relation=relation,
            sampling_method=method,
            max_epsilon=epsilon_budget,
        )
        self.sample_size = sample_size
        self.sampling = sampling
        self._accountant = RdpAccountant(self.config)

    @property
    def sampling_rate(self) -> float:
        return self.sample_size / self.config.population_size

    @property
    def epsilon_budget(self) -> float | None:
        return self.config.max_epsilon

    def _events(self, releases: list[Release]) -> list[GaussianPrivacyEvent]:
        return [
            GaussianPrivacyEvent(r.noise_multiplier, self.sample_size, self.config.population_size)
            for r in releases
        ]

    def epsilon_after(self, releases: list[Release]) -> float:
        """Epsilon if `releases` were composed now (the committed state is not changed)."""
        projected = RdpAccountant(self.config)
        projected.load_state_dict(self._accountant.state_dict())
        for event in self._events(releases):
            projected.compose(event)
        return projected.get_epsilon(self.config.target_delta)

    def would_exceed_budget(self, releases: list[Release]) -> tuple[bool, float]:
        """(exceeds, projected epsilon) for one more round of `releases`."""
        if self.epsilon_budget is None:
            return False, float("nan")
        projected = self.epsilon_after(releases)
        return projected > self.epsilon_budget, projected

    def spend(self, releases: list[Release]) -> None:
        for event in self._events(releases):
            self._accountant.compose(event)

    @property
    def epsilon(self) -> float:
        if self._accountant.num_releases == 0:
            return 0.0
        return self._accountant.get_epsilon(self.config.target_delta)

    def report(self) -> dict[str, float | int | str]:
        return {
            "epsilon": self.epsilon,
            "delta": self.config.target_delta,
            "sampling_rate": self.sampling_rate,
            "releases": self._accountant.num_releases,
            "accounting": f"rdp/{self.sampling}",
        }

    def state_dict(self) -> dict[str, object]:
        return self._accountant.state_dict()
