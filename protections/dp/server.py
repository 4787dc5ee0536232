"""Client-level differential privacy as strategy wrappers (DP-FedAvg, McMahan et al. 2018).

Each round the server computes, from the global model w it sent and the clients' models w_i,

    w_next = inner( w + ( sum_i clip_C(w_i - w) + N(0, (z C)^2 I) ) / m )

with m the number of clients sampled for the round, C the clipping norm and z the noise
multiplier. Why it is written here and not taken from Flower's `DifferentialPrivacy*` wrappers:
- Sensitivity. Flower's wrappers clip, let the inner strategy take the example-weighted mean,
  then add noise of std zC/m. A client that claims many examples then moves the mean by more
  than C/m, and the noise no longer covers it. Here the mean is uniform over the m sampled
  clients, whatever `num_examples` they claim, so one client moves it by at most C/m.
- Order. Noise is added to the averaged *update* before the inner strategy sees it, so server
  optimizers (FedAdam, FedAvgM momentum) only post-process a private quantity; noise added after
  the inner step would leave their state computed from the un-noised mean.
- Randomness. Noise comes from an injected generator: seeded for tests, OS-seeded by default,
  or a CSPRNG (`SecureGaussian`) in secure mode; never the global NumPy RNG.
- Accounting. Every round composes its releases in `ClientLevelAccountant` (Flower's
  RdpAccountant), reports (epsilon, delta), and stops before a round that would exceed the budget.
Flower's `compute_adaptive_noise_params` (the noise split of adaptive clipping) is reused as is.

Variants (`privacy=`): `server_fixed` clips on the server; `client_fixed` has clients clip (the
server checks the norm and rejects an update that exceeds C); `adaptive` clips on the server with
a norm that tracks a quantile of update norms (Andrew et al. 2021).
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from protections.dp.mechanisms import (
    CLIP_NORM_KEY,
    EPSILON_METRIC,
    LOCAL_NOISE_KEY,
    NormalSource,
    SecureGaussian,
    clip_update,
    l2_norm,
)
from protections.dp.accounting import ClientLevelAccountant, Release
from protections.dp.sampling import PrivateCohort
from protections.base import NoisySecureSum, StrategyWrapper
from core.result_types import ClientAccountedPrivacy, ServerAccountedPrivacy

# Slack for float error when checking a client-clipped update's norm.
NORM_TOLERANCE = 1e-4


class ClientLevelDP(StrategyWrapper):
    """Common part of the client-level DP wrappers; subclasses decide how updates are bounded."""

    section = "privacy"

    def __init__(
        self,
        strategy,
        *,
        noise_multiplier: float,
        clipping_norm: float,
        target_delta: float,
        epsilon_budget: float | None = None,
        sampling: str = "poisson",
        noise: NormalSource | None = None,
        metrics_fn=None,
        unprotected_metrics: bool = False,
    ) -> None:
        super().__init__(strategy)
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0")
        if clipping_norm <= 0:
            raise ValueError(f"clipping_norm={clipping_norm} must be > 0")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta={target_delta} must be in (0, 1)")
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.target_delta = target_delta
        self.epsilon_budget = epsilon_budget
        self.sampling = sampling
        if sampling not in ("poisson", "without_replacement"):
            raise ValueError(f"sampling={sampling!r}: use poisson or without_replacement")
        # Privacy noise comes from the OS CSPRNG unless a test injects a seeded generator.
        self.noise = noise if noise is not None else SecureGaussian()
        self.metrics_fn = metrics_fn
        self.unprotected_metrics = unprotected_metrics
        self.accountant: ClientLevelAccountant | None = None
        self._global: dict[int, NDArrays] = {}
        self._sampled: dict[int, int] = {}
        self._reports: dict[int, ServerAccountedPrivacy] = {}
        self._empty_rounds: set[int] = set()
        self._rejections: dict[int, list[tuple[str, str]]] = {}
        self._stop: str | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(z={self.noise_multiplier}, C={self.clipping_norm}, "
            f"delta={self.target_delta}, budget={self.epsilon_budget}, {self.strategy!r})"
        )

    # ------------------------------------------------------------------ hooks for subclasses
    def releases(self) -> list[Release]:
        """What one round releases, for the accountant."""
        return [Release(self.noise_multiplier)]

    def bound_update(self, cid: str, update: NDArrays) -> tuple[NDArrays, bool] | None:
        """Return (update with norm <= C, was clipped), or None to reject it."""
        return clip_update(update, self.clipping_norm)

    def client_config(self) -> dict[str, float]:
        return {}

    def remember_global(self, server_round: int, parameters: Parameters) -> None:
        """Keep the model sent this round: updates are measured from it."""
        self._global = {server_round: self.global_model.arrays(parameters)}

    def after_round(self, server_round: int, clipped: list[bool]) -> None:
        """Subclasses adapt state (the adaptive clipping norm) here."""

    # ------------------------------------------------------------------ Flower strategy API
    def expected_cohort(self, population: int) -> int:
        """m: the clients Flower's strategy would sample of `population` (fraction_train,
        min_train_clients). Poisson sampling uses q = m/N; fixed-size sampling draws m."""
        inner = self.strategy
        while not hasattr(inner, "num_fit_clients") and isinstance(inner, StrategyWrapper):
            inner = inner.strategy  # e.g. the HE layer: the base strategy samples
        num_fit_clients = getattr(inner, "num_fit_clients", None)
        return num_fit_clients(population)[0] if num_fit_clients else population

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        population = client_manager.num_available()
        m = min(self.expected_cohort(population), population)
        if m <= 0:
            return []
        if self.noise_multiplier > 0:
            if self.accountant is None:
                if self.target_delta >= 1 / population:
                    raise ValueError(
                        f"privacy.target_delta={self.target_delta} is not below 1/N = "
                        f"1/{population} connected clients: with delta that large one "
                        "client's data may be released outright; use delta << 1/N"
                    )
                self.accountant = ClientLevelAccountant(
                    population, m, self.target_delta, self.sampling, self.epsilon_budget
                )
            elif population != self.accountant.config.population_size:
                n0, m0 = self.accountant.config.population_size, self.accountant.sample_size
                if self.sampling != "poisson":
                    # Sampling m of a different N changes the amplification the accountant
                    # composed: no honest epsilon for this round, so no round.
                    self._stop = (
                        f"round {server_round}: {population} clients connected but the "
                        f"accountant samples {m0} of {n0} (accounting=without_replacement "
                        "assumes the same population every round)"
                    )
                    log(WARNING, "Stopping before round %s: %s", server_round, self._stop)
                    return []
                log(
                    INFO,
                    "Round %s: %d clients connected (%d at round 1); Poisson sampling keeps "
                    "q = %d/%d and the divisor %d, so the accounting still holds",
                    server_round, population, n0, m0, n0, m0,
                )  # fmt: skip
            if self.accountant is not None:
                # q and the divisor are fixed at round 1 and never follow the population.
                population, m = self.accountant.config.population_size, self.accountant.sample_size
            exceeds, projected = self.accountant.would_exceed_budget(self.releases())
            if exceeds:
                self._stop = (
                    f"privacy budget: round {server_round} would bring epsilon to "
                    f"{projected:.3f} > epsilon_budget {self.epsilon_budget} "
                    f"(delta {self.target_delta}); spent {self.accountant.epsilon:.3f}"
                )
                log(INFO, "Stopping before round %s: %s", server_round, self._stop)
                return []
        poisson = self.sampling == "poisson"
        cohort = PrivateCohort(client_manager, poisson_rate=m / population if poisson else None)
        instructions = super().configure_fit(server_round, parameters, cohort)
        self.remember_global(server_round, parameters)
        # The mean divides by m: the exact cohort (fixed size) or its expectation q*N
        # (Poisson), a public constant, so the cohort's actual size is never released.
        self._sampled[server_round] = m
        if not instructions and poisson:
            # An empty Poisson cohort is a round of the analysed mechanism: the server
            # releases noise alone (ExperimentServer calls aggregate_fit with no results).
            self._empty_rounds.add(server_round)
            log(INFO, "Round %s: the Poisson cohort is empty; releasing noise only", server_round)
        extra = self.client_config()
        for _, ins in instructions:
            ins.config.update(extra)
        return instructions

    def empty_round(self, server_round: int) -> bool:
        return server_round in self._empty_rounds or super().empty_round(server_round)

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        return self._rejections.get(server_round, []) + super().rejected_updates(server_round)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dp"] = {
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "clipping_norm": self.clipping_norm,
            "stop": self._stop,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dp = state["dp"]
        if dp["accountant"] is not None:
            self.accountant = ClientLevelAccountant.from_state_dict(
                dp["accountant"], self.target_delta, self.epsilon_budget
            )
        self.clipping_norm = float(dp["clipping_norm"])
        self._stop = dp["stop"]

    def stop_reason(self) -> str | None:
        return self._stop or super().stop_reason()

    def accounts_releases(self) -> bool:
        return True

    def aggregate_fit(self, server_round, results, failures):
        global_weights = self._global.get(server_round)
        if global_weights is None or not (results or server_round in self._empty_rounds):
            return None, {}
        bounded: list[NDArrays] = []
        clipped: list[bool] = []
        failures = list(failures)
        for proxy, res in results:
            update = [
                w - g for w, g in zip(parameters_to_ndarrays(res.parameters), global_weights)
            ]
            outcome = self.bound_update(proxy.cid, update)
            if outcome is None:
                failures.append(ValueError(f"node {proxy.cid}: update norm exceeds C"))
                self._rejections.setdefault(server_round, []).append(
                    (str(proxy.cid), f"update norm exceeds clipping_norm {self.clipping_norm}")
                )
                continue
            bounded.append(outcome[0])
            clipped.append(outcome[1])
        if not bounded and server_round not in self._empty_rounds:
            return None, {}
        m = self._sampled[server_round]
        std = self.noise_std()
        mean_update = []
        for i, g in enumerate(global_weights):
            total = np.zeros(g.shape, dtype=np.float64)
            for u in bounded:
                total += u[i]
            if std > 0:
                total = total + self.noise.normal(0.0, std, g.shape)
            mean_update.append((total / m).astype(g.dtype))
        private = [g + u for g, u in zip(global_weights, mean_update)]
        # The inner strategy sees one (already private) result: FedAvg returns it as is,
        # server optimizers treat it as their pseudo-gradient target.
        proxy0 = results[0][0] if results else None
        single = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(private), 1, {})
        parameters, _ = self.strategy.aggregate_fit(server_round, [(proxy0, single)], failures)
        if self.accountant is not None:
            self.accountant.spend(self.releases())
        self._reports[server_round] = self._privacy_report(clipped, len(bounded), m)
        self.after_round(server_round, clipped)
        metrics = {}
        if self.metrics_fn is not None and results:
            metrics = self.metrics_fn([(res.num_examples, res.metrics) for _, res in results])
        return parameters, metrics

    def noise_std(self) -> float:
        return self.noise_multiplier * self.clipping_norm

    def _privacy_report(
        self, clipped: list[bool], received: int, sampled: int
    ) -> ServerAccountedPrivacy:
        """What the round released and what it cost. Counts computed from the clients' data
        (how many were clipped) are left out unless the user opted into unprotected metrics;
        what is in the results but outside the guarantee is named in `not_covered`."""
        not_covered = [
            "clients_aggregated, clients.trained/failed and comm bytes: the real cohort size (an "
            "operator record; the released model divides by the public cohort_divisor)"
        ]
        clients_clipped = None
        if self.unprotected_metrics and clipped:
            clients_clipped = int(sum(clipped))
            not_covered.append("clients_clipped: exact count, no noise (opted in)")
        if self.unprotected_metrics:
            not_covered.append(
                "train metrics and federated evaluation: computed on the clients' data, "
                "no noise (opted in)"
            )
        if self.accountant is not None:
            spent = self.accountant.report()
        else:  # z = 0: no privacy
            spent = {"epsilon": float("inf"), "delta": self.target_delta}
        return ServerAccountedPrivacy(
            mechanism=type(self).__name__,
            noise_multiplier=self.noise_multiplier,
            clipping_norm=self.clipping_norm,
            sampling=self.sampling,
            cohort_divisor=sampled,
            clients_aggregated=received,
            clients_clipped=clients_clipped,
            not_covered=not_covered,
            **spent,
        )

    def report(self, server_round: int) -> ServerAccountedPrivacy | None:
        return self._reports.get(server_round)


class ServerSideFixedClipping(ClientLevelDP):
    """`privacy=server_fixed`: the server clips every update to C."""


class ClientSideFixedClipping(ClientLevelDP):
    """`privacy=client_fixed`: clients clip to C (norm sent in the fit config); the server only
    checks. Needed where the server cannot see updates (secure aggregation)."""

    def client_config(self) -> dict[str, float]:
        return {CLIP_NORM_KEY: self.clipping_norm}

    def bound_update(self, cid: str, update: NDArrays):
        norm = l2_norm(update)
        if norm > self.clipping_norm * (1 + NORM_TOLERANCE):
            log(  # not the norm itself: it is computed from the client's data, without noise
                WARNING,
                "Rejected update of node %s: its norm exceeds clipping_norm %.4f (the client "
                "did not clip)",
                cid,
                self.clipping_norm,
            )
            return None
        return update, False


class EncryptedClientSideClipping(ClientSideFixedClipping):
    """`privacy=client_fixed` under `secagg=he`: clients clip, the secure-sum layer below
    (protections/he/server.py `HomomorphicAggregation`, through the `NoisySecureSum` interface
    of protections/base.py, so this module imports nothing of the HE layer) sums the encrypted
    updates, and this wrapper has it add N(0, (zC)^2) to the encrypted sum (as a plaintext,
    ct + pt) and accounts the round exactly as in the clear.

    What differs from the plaintext path, and why the guarantee is the same:
    - The server cannot check norms; the guarantee assumes clients clip (as with any secure
      aggregation). Clients clip to C minus the fixed-point rounding slack, so what they
      encrypt is within C of the global model.
    - Clients encrypt their clipped *model* (global + clipped update) with weight 1; key
      holders know the global model and the count K, so the released (sum + noise, K) is the
      plaintext mechanism's (sum of clipped updates + noise) up to public post-processing. The
      mean is over the K clients received (the plaintext path divides by the m sampled; the
      same when none drops out), since the sum holds K copies of the global model.
    """

    def __init__(self, strategy, **kwargs) -> None:
        if not isinstance(strategy, NoisySecureSum):
            raise TypeError("EncryptedClientSideClipping wraps a secure sum (NoisySecureSum)")
        if kwargs.get("sampling", "poisson") != "without_replacement":
            # An empty Poisson cohort must still release noise, which needs a ciphertext
            # of the global model that no client sent: not supported under HE.
            raise ValueError("secagg=he samples a fixed-size cohort: use sampling=without_replacement")
        super().__init__(strategy, **kwargs)
        self.secure_sum: NoisySecureSum = strategy
        self.secure_sum.count_each_client_once()

    def remember_global(self, server_round: int, parameters: Parameters) -> None:
        """Nothing to keep: the server never measures an update under HE (and would only
        hold ciphertexts)."""

    def aggregate_fit(self, server_round, results, failures):
        self.secure_sum.noise_next_sum(self.noise_std(), self.noise)
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        if self.secure_sum.rolled_back(server_round):
            # The clients refused the model and the HE layer restored an earlier one: nothing
            # new is released this round (the refused sum was accounted when it was made).
            return parameters, metrics
        if self.accountant is not None:
            self.accountant.spend(self.releases())
        received = self.secure_sum.clients_summed(server_round)
        report = self._privacy_report([], received, self._sampled[server_round])
        report.clients_clipped = None  # clients clip under HE; the server sees no norm
        self._reports[server_round] = report
        return parameters, metrics


class AdaptiveClipping(ClientLevelDP):
    """`privacy=adaptive`: server-side clipping with a norm that follows the target quantile of
    update norms (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

    Each round also releases the noised count of unclipped clients: sum_i (b_i - 1/2) +
    N(0, sigma_b^2) with b_i = [||update_i|| <= C], sensitivity 1/2 (noise multiplier
    2 sigma_b). The update noise z_delta is raised so that the two releases together cost what
    one release at the configured z would: (z_delta^-2 + (2 sigma_b)^-2)^-1/2 = z. Both come
    from the same cohort, so the accountant composes them as one sampled Gaussian of that
    joint multiplier per round (composing two independently sampled events under-reports).
    """

    def __init__(
        self,
        strategy,
        *,
        target_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(strategy, **kwargs)
        if not 0 <= target_quantile <= 1:
            raise ValueError(f"target_quantile={target_quantile} must be in [0, 1]")
        if clip_norm_lr <= 0:
            raise ValueError(f"clip_norm_lr={clip_norm_lr} must be > 0")
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev_config = clipped_count_stddev
        self.clipped_count_stddev = 0.0
        self.update_noise_multiplier = self.noise_multiplier

    def configure_fit(self, server_round, parameters, client_manager):
        expected = self.expected_cohort(client_manager.num_available())
        self.clipped_count_stddev, self.update_noise_multiplier = compute_adaptive_noise_params(
            self.noise_multiplier, expected, self.clipped_count_stddev_config
        )
        return super().configure_fit(server_round, parameters, client_manager)

    def releases(self) -> list[Release]:
        """The noised update and the noised count come from the same cohort: one sampled
        Gaussian whose joint multiplier (z_u^-2 + (2 sigma_b)^-2)^-1/2 is the configured z."""
        joint = (self.update_noise_multiplier**-2 + (2 * self.clipped_count_stddev) ** -2) ** -0.5
        return [Release(joint, "update+clipped_count")]

    def noise_std(self) -> float:
        return self.update_noise_multiplier * self.clipping_norm

    def after_round(self, server_round: int, clipped: list[bool]) -> None:
        m = self._sampled[server_round]
        centered = sum(0.5 if not c else -0.5 for c in clipped)
        if self.clipped_count_stddev > 0:
            centered += float(self.noise.normal(0.0, self.clipped_count_stddev, ()))
        unclipped_fraction = centered / m + 0.5
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped_fraction - self.target_quantile))
        report = self._reports[server_round]
        report.update_noise_multiplier = self.update_noise_multiplier
        report.clipped_count_stddev = self.clipped_count_stddev
        report.next_clipping_norm = self.clipping_norm


class ClientReportedPrivacy(StrategyWrapper):
    """`privacy=local` and `privacy=dpsgd`: the noise is added on the clients, and each client
    accounts its own epsilon (local DP: per release; DP-SGD: Opacus' accountant over every
    step it took). The server sends the local-DP parameters, keeps the inner aggregation and
    reports the largest and the mean client epsilon of the round."""

    section = "privacy"

    def __init__(
        self,
        strategy,
        *,
        target_delta: float,
        client_config: dict | None = None,
        unprotected_metrics: bool = False,
    ):
        super().__init__(strategy)
        self.target_delta = target_delta
        self.client_config = dict(client_config or {})
        self.unprotected_metrics = unprotected_metrics
        self._reports: dict[int, ClientAccountedPrivacy] = {}
        self._max_epsilon = 0.0

    def __repr__(self) -> str:
        return f"ClientReportedPrivacy({self.client_config}, {self.strategy!r})"

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self.client_config)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        epsilons = [
            float(res.metrics[EPSILON_METRIC]) for _, res in results if EPSILON_METRIC in res.metrics
        ]
        if epsilons:
            self._max_epsilon = max(self._max_epsilon, *epsilons)
            local = LOCAL_NOISE_KEY in self.client_config
            not_covered = [
                "clients.trained/failed and comm bytes: how many took part (an operator record)",
            ]
            if self.unprotected_metrics:
                not_covered.append(
                    "train metrics, example counts and federated evaluation (opted in)"
                )
            self._reports[server_round] = ClientAccountedPrivacy(
                mechanism="local" if local else "dpsgd",
                epsilon=self._max_epsilon,  # worst client so far: the run's guarantee
                epsilon_round_max=max(epsilons),
                epsilon_round_mean=float(np.mean(epsilons)),
                delta=self.target_delta,
                accounting="per client",
                neighbouring=(
                    "replace one client's data set (local DP: any two inputs of a client)"
                    if local
                    else "add or remove one example of a client (DP-SGD)"
                ),
                not_covered=not_covered,
            )
        return super().aggregate_fit(server_round, results, failures)

    def report(self, server_round: int) -> ClientAccountedPrivacy | None:
        return self._reports.get(server_round)
