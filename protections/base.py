"""Base class of our strategy wrappers (decorator pattern, like Flower's DP wrappers).

A wrapper holds `self.strategy` and forwards every call; subclasses override only what they
change. Flower's legacy `flwr.server.strategy.Strategy` API is used because it is the one that
pairs with `NumPyClient`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy


class NormalSource(Protocol):
    """Where a DP layer draws Gaussian noise (protections/dp/mechanisms.py makes them); the HE
    layer takes one to add noise to the encrypted sum, so the type lives here, below both."""

    def normal(self, loc: float, scale: float, size: Any) -> np.ndarray: ...


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of a model payload's tensors as they cross the wire (headers included)."""
    return sum(len(tensor) for tensor in parameters.tensors)


class StrategyWrapper(Strategy):
    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(f"{type(self).__name__} wraps a flwr Strategy, got {strategy!r}")
        self.strategy = strategy

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

    def round_report(self, server_round: int) -> dict[str, Any]:
        """What this stack measured in `server_round`, merged into results.json's round entry."""
        inner = self.strategy
        return inner.round_report(server_round) if isinstance(inner, StrategyWrapper) else {}

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
        return self.strategy.evaluate(server_round, parameters)


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
