"""Base class of our strategy wrappers (decorator pattern, like Flower's DP wrappers), and
the few types protections share without importing each other.

A wrapper holds `self.strategy` and forwards every call; subclasses override only what they
change. Flower's legacy `flwr.server.strategy.Strategy` API is used because it is the one that
pairs with `NumPyClient`.

What the layers share, defined here so that no protection imports another:
- `section` / `report`: how a layer contributes its typed part of a round's record
  (core/result_types.py `RoundRecord`); the round loop collects them with `contribute`.
- `GlobalModel`: the global model of the round, decoded from its wire format once and read
  by every layer that compares updates with it, by centralized evaluation and the checkpoint.
- `NoisySecureSum`: a layer that sums updates the server cannot read and can add noise to that
  sum (protections/he/server.py implements it; the DP layer above it uses it, protections/dp/
  server.py `EncryptedClientSideClipping`); strategies/factory.py stacks the two.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from core.result_types import LAYER_SECTIONS, RoundRecord


class NormalSource(Protocol):
    """Where a DP layer draws Gaussian noise (protections/dp/mechanisms.py makes them); the HE
    layer takes one to add noise to the encrypted sum, so the type lives here, below both."""

    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray: ...


@runtime_checkable
class NoisySecureSum(Protocol):
    """A layer that sums the clients' updates without the server reading them, and can add
    Gaussian noise to that sum before it is released (client-level DP under secure
    aggregation: the DP layer calibrates and accounts the noise, this layer adds it)."""

    def count_each_client_once(self) -> None:
        """Weigh every client 1 instead of by its examples (one client moves the sum by at
        most its clipped update: the sensitivity the DP layer accounts)."""

    def noise_next_sum(self, std: float, source: NormalSource) -> None:
        """Add N(0, std^2) from `source` to every value of the sums released from now on."""

    def clients_summed(self, server_round: int) -> int:
        """How many clients' updates the round's released sum holds (0: none released)."""

    def rolled_back(self, server_round: int) -> bool:
        """True when the round released no new sum but restored an earlier model."""


class GlobalModel:
    """The global model, decoded once per round and shared by the whole stack.

    The round loop (app/experiment_server.py) hands the same `Parameters` object to
    `configure_fit`, centralized `evaluate` and the checkpoint, and every layer that measures
    updates against the model it sent (validation, compression, DP) needs its arrays: each
    used to run `parameters_to_ndarrays` itself. `arrays(parameters)` decodes only when
    `parameters` is not the object decoded last. The arrays are read-only, so no layer can
    change what another one compares with."""

    def __init__(self) -> None:
        self._parameters: Parameters | None = None
        self._arrays: NDArrays = []
        self.decodes = 0  # how many times a model was decoded (tests and the benchmark read it)

    def arrays(self, parameters: Parameters) -> NDArrays:
        if parameters is not self._parameters:
            arrays = parameters_to_ndarrays(parameters)
            for array in arrays:
                array.flags.writeable = False
            self._parameters, self._arrays = parameters, arrays
            self.decodes += 1
        return self._arrays


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of a model payload's tensors as they cross the wire (headers included)."""
    return sum(len(tensor) for tensor in parameters.tensors)


class StrategyWrapper(Strategy):
    # The RoundRecord field (core/result_types.py LAYER_SECTIONS) this layer fills with `report`.
    section: ClassVar[str | None] = None

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"{type(self).__name__} wraps a flwr Strategy, got {strategy!r}")
        if self.section is not None and self.section not in LAYER_SECTIONS:
            raise TypeError(f"{type(self).__name__}.section={self.section!r} is not a round section")
        self.strategy = strategy
        # One decoded global model for the whole stack: the wrapped layer's, or a new one.
        self.global_model = (
            strategy.global_model if isinstance(strategy, StrategyWrapper) else GlobalModel()
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r})"

    # Hooks the round loop (app/experiment_server.py) reads; each layer adds its part.
    def stop_reason(self) -> str | None:
        """Why no further round may run (e.g. the privacy budget), or None."""
        inner = self.strategy
        return inner.stop_reason() if isinstance(inner, StrategyWrapper) else None

    def empty_round(self, server_round: int) -> bool:
        """True when `configure_fit` sampled nobody on purpose (an empty Poisson cohort): the
        round still runs, `aggregate_fit` is called with no results (noise-only release)."""
        inner = self.strategy
        return inner.empty_round(server_round) if isinstance(inner, StrategyWrapper) else False

    def report(self, server_round: int) -> Any | None:
        """This layer's section of `server_round` (a core/result_types.py dataclass, or an int),
        None when it measured nothing. Only layers that name a `section` override it."""
        return None

    def contribute(self, server_round: int, record: RoundRecord) -> None:
        """Fill `record` with the section of every layer of this stack (each its own field;
        two layers claiming the same one is a stacking error)."""
        layer: Strategy = self
        while isinstance(layer, StrategyWrapper):
            if layer.section is not None:
                value = layer.report(server_round)
                if value is not None:
                    if getattr(record, layer.section) is not None:
                        raise ValueError(f"two layers report the round's {layer.section!r}")
                    setattr(record, layer.section, value)
            layer = layer.strategy

    def round_report(self, server_round: int) -> dict[str, Any]:
        """The layers' sections of `server_round` as results.json's round entry holds them."""
        record = RoundRecord(round=server_round)
        self.contribute(server_round, record)
        return record.sections()

    def accounts_releases(self) -> bool:
        """True when a layer's privacy accountant counts each aggregate this stack releases.
        The round loop then checkpoints a round before its aggregate leaves the server for
        federated evaluation (app/experiment_server.py): resuming from the round before
        would release that round again, with fresh noise, and count it once."""
        inner = self.strategy
        return inner.accounts_releases() if isinstance(inner, StrategyWrapper) else False

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        """(node id, reason) of each update of `server_round` a layer refused to aggregate."""
        inner = self.strategy
        return inner.rejected_updates(server_round) if isinstance(inner, StrategyWrapper) else []

    def rolled_back(self, server_round: int) -> bool:
        """True when `server_round` aggregated nothing but restored an earlier global model
        (the clients refused the one they were sent, see HomomorphicAggregation)."""
        inner = self.strategy
        return inner.rolled_back(server_round) if isinstance(inner, StrategyWrapper) else False

    def state_dict(self) -> dict[str, Any]:
        """What this stack must carry across a restart (app/checkpoint.py): each layer adds
        its own part; the innermost Flower strategy's optimizer state is `base`."""
        inner = self.strategy
        if isinstance(inner, StrategyWrapper):
            return {"inner": inner.state_dict()}
        return {"base": base_strategy_state(inner)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = self.strategy
        if isinstance(inner, StrategyWrapper):
            inner.load_state_dict(state["inner"])
        else:
            load_base_strategy_state(inner, state["base"])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        # A client without validation examples (dataset.val_fraction=0, or a partition of
        # under two examples) reports 0 examples: nothing to weight, and Flower's weighted
        # mean would divide by zero when every sampled client has none.
        results = [(proxy, res) for proxy, res in results if res.num_examples > 0]
        if not results:
            return None, {}
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        inner = self.strategy
        if isinstance(inner, StrategyWrapper) or type(inner).evaluate is not FedAvg.evaluate:
            return inner.evaluate(server_round, parameters)
        # Flower's FedAvg.evaluate (which FedAvgM, FedProx and FedAdam inherit), on the
        # shared decoded model instead of a fresh parameters_to_ndarrays.
        if inner.evaluate_fn is None:
            return None
        res = inner.evaluate_fn(server_round, self.global_model.arrays(parameters), {})
        if res is None:
            return None
        loss, metrics = res
        return loss, metrics


# Server optimizer state of Flower's strategies: FedOpt (FedAdam, FedYogi, FedAdagrad) keeps
# its moments and current weights, FedAvgM its momentum and the weights it steps from.
_BASE_ARRAYS = ("current_weights", "m_t", "v_t", "momentum_vector")


def base_strategy_state(strategy: Strategy) -> dict[str, Any]:
    from flwr.common import parameters_to_ndarrays

    state: dict[str, Any] = {}
    for name in _BASE_ARRAYS:
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = [np.asarray(a) for a in value]
    initial = getattr(strategy, "initial_parameters", None)
    if initial is not None and hasattr(strategy, "momentum_vector"):
        state["initial_parameters"] = parameters_to_ndarrays(initial)
    return state


def load_base_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    from flwr.common import ndarrays_to_parameters

    for name in _BASE_ARRAYS:
        if name in state:
            setattr(strategy, name, list(state[name]))
    if "initial_parameters" in state:
        strategy.initial_parameters = ndarrays_to_parameters(list(state["initial_parameters"]))
