"""Client-level privacy accounting: (epsilon, delta) after every round, and the budget check.

No RDP or PLD formula is written here: Flower 1.41's `RdpAccountant` (a wrapper over Google's
dp-accounting, installed with `flwr[dp]`) composes one sampled Gaussian event per round, and
dp-accounting's PLD accountant recomputes the same composition as a second, tighter figure. What
we add is the bookkeeping our strategies need: a prospective budget check that never mutates
the committed state, the sensitivity each neighbouring relation implies, and the report that
goes into results.json.

The mechanism and its analysis match (the server samples the way it accounts):
- `poisson` (default; add-or-remove-one client): every available client joins a round
  independently with probability q (protections/dp/sampling.py), the sum of clipped updates has
  sensitivity C, and the mean divides by the expected cohort q*N, a public constant.
- `without_replacement` (replace-one client): exactly m of N clients, uniformly. Replacing one
  client's data by anyone else's moves the sum by up to 2C, so the event is a Gaussian of
  multiplier z/2 for sensitivity 1. (dp-accounting's RDP analysis of sampling without
  replacement, Wang, Balle and Kasiviswanathan 2019, is stated for sensitivity 1 under
  replace-one; passing z unchanged under-reported epsilon about 2x.) PLD has no event for
  sampling without replacement: only RDP is reported there.
Both assume all N clients are available in every round (N is fixed at the first round; a
round that sees another population logs a warning); dropouts are not modelled.

One round is one event even when it releases several things from the same cohort: adaptive
clipping's noised update and noised count use the same sampled clients, so together they are
one sampled Gaussian with the joint multiplier (z_u^-2 + (2 sigma_b)^-2)^-1/2, which the
adaptive wrapper keeps equal to the configured z (Andrew et al. 2021). Composing them as two
independently sampled events under-reported epsilon by 1-20%.
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

from protections.dp.mechanisms import pld_epsilon


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
# L2 sensitivity of a sum of contributions each bounded by C, in units of C.
SENSITIVITY = {
    NeighboringRelation.ADD_OR_REMOVE_ONE: 1.0,
    NeighboringRelation.REPLACE_ONE: 2.0,
}
NEIGHBOURS = {
    NeighboringRelation.ADD_OR_REMOVE_ONE: "add or remove one client's data",
    NeighboringRelation.REPLACE_ONE: "replace one client's data",
}


@dataclass(frozen=True)
class Release:
    """One Gaussian release per round: noise std = noise_multiplier * C, where C bounds one
    contribution (add-or-remove sensitivity)."""

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
        """`sample_size`: m clients per round (without_replacement), or the expected cohort
        m = q*N (poisson: each client joins with probability q = m/N)."""
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
        self.sensitivity = SENSITIVITY[relation]
        self._accountant = RdpAccountant(self.config)
        self._spent: list[float] = []  # noise multiplier (add/remove units) of every release

    @property
    def sampling_rate(self) -> float:
        return self.sample_size / self.config.population_size

    @property
    def epsilon_budget(self) -> float | None:
        return self.config.max_epsilon

    def _events(self, releases: list[Release]) -> list[GaussianPrivacyEvent]:
        return [
            GaussianPrivacyEvent(
                r.noise_multiplier / self.sensitivity, self.sample_size, self.config.population_size
            )
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
        for release, event in zip(releases, self._events(releases)):
            self._accountant.compose(event)
            self._spent.append(release.noise_multiplier)

    @property
    def epsilon(self) -> float:
        if self._accountant.num_releases == 0:
            return 0.0
        return self._accountant.get_epsilon(self.config.target_delta)

    @property
    def epsilon_pld(self) -> float | None:
        """The same composition under dp-accounting's PLD accountant (tighter than RDP), or
        None where PLD has no event for the sampling (without replacement)."""
        if self.sampling != "poisson" or not self._spent:
            return None if self.sampling != "poisson" else 0.0
        events: dict[float, int] = {}
        for z in self._spent:
            events[z] = events.get(z, 0) + 1
        q = self.sampling_rate
        return pld_epsilon(
            [(q, z, n) for z, n in events.items()], self.config.target_delta, "add_or_remove_one"
        )

    def report(self) -> dict[str, float | int | str]:
        report: dict[str, float | int | str] = {
            "epsilon": self.epsilon,
            "delta": self.config.target_delta,
            "sampling_rate": self.sampling_rate,
            "releases": self._accountant.num_releases,
            "accounting": f"rdp/{self.sampling}",
            "neighbouring": NEIGHBOURS[self.config.neighboring_relation],
        }
        pld = self.epsilon_pld
        if pld is not None:
            report["epsilon_pld"] = pld
        return report

    def state_dict(self) -> dict[str, object]:
        return {
            "population_size": self.config.population_size,
            "sample_size": self.sample_size,
            "sampling": self.sampling,
            "spent": list(self._spent),
        }

    @classmethod
    def from_state_dict(cls, state: dict, target_delta: float, epsilon_budget: float | None):
        """The accountant of a checkpoint: the same releases composed again (replaying them
        gives exactly the state they produced)."""
        accountant = cls(
            int(state["population_size"]), int(state["sample_size"]), target_delta,
            str(state["sampling"]), epsilon_budget,
        )  # fmt: skip
        accountant.spend([Release(float(z)) for z in state["spent"]])
        return accountant
