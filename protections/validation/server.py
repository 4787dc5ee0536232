"""Reject malformed client updates before they reach aggregation.

A client that returns the wrong number of tensors, a wrong shape or dtype, or non-finite
values would crash FedAvg's weighted mean or poison the global model. Flower's strategies
assume well-formed results, so this wrapper checks each one against the parameters the server
sent in this round, moves offenders to `failures` with a logged reason, and lets the round go
on with the rest (the inner strategy's `accept_failures` then decides, as for any failure).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.common import FitRes, Parameters, parameters_to_ndarrays
from flwr.common.logger import log

from protections.base import StrategyWrapper


class MalformedUpdateError(ValueError):
    """A client's fit result does not match the model the server sent."""


def check_update(expected: list[np.ndarray], res: FitRes) -> None:
    """Raise MalformedUpdateError naming the first problem in `res`."""
    if res.num_examples <= 0:
        raise MalformedUpdateError(f"num_examples={res.num_examples} (must be > 0)")
    try:
        arrays = parameters_to_ndarrays(res.parameters)
    except Exception as err:  # noqa: BLE001 - any deserialization failure is malformed
        raise MalformedUpdateError(f"undecodable tensors ({type(err).__name__}: {err})") from err
    if len(arrays) != len(expected):
        raise MalformedUpdateError(f"{len(arrays)} tensors, expected {len(expected)}")
    for i, (got, want) in enumerate(zip(arrays, expected)):
        if got.shape != want.shape:
            raise MalformedUpdateError(f"tensor {i} has shape {got.shape}, expected {want.shape}")
        if got.dtype != want.dtype:
            raise MalformedUpdateError(f"tensor {i} has dtype {got.dtype}, expected {want.dtype}")
        if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
            raise MalformedUpdateError(f"tensor {i} has non-finite values")


class RejectMalformedUpdates(StrategyWrapper):
    section = "rejected_updates"  # how many updates of the round were refused

    def __init__(self, strategy) -> None:
        super().__init__(strategy)
        self._sent: dict[int, list[np.ndarray]] = {}
        self.rejected: dict[int, int] = {}
        self.rejections: dict[int, list[tuple[str, str]]] = {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        self._sent = {server_round: self.global_model.arrays(parameters)}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        expected = self._sent.get(server_round)
        if expected is None:
            return super().aggregate_fit(server_round, results, failures)
        accepted, failures = [], list(failures)
        for proxy, res in results:
            try:
                check_update(expected, res)
            except MalformedUpdateError as err:
                log(WARNING, "Round %s: rejected update of node %s: %s", server_round, proxy.cid, err)
                failures.append(err)
                self.rejected[server_round] = self.rejected.get(server_round, 0) + 1
                self.rejections.setdefault(server_round, []).append((str(proxy.cid), str(err)))
            else:
                accepted.append((proxy, res))
        return super().aggregate_fit(server_round, accepted, failures)

    def rejected_updates(self, server_round: int) -> list[tuple[str, str]]:
        return self.rejections.get(server_round, []) + super().rejected_updates(server_round)

    def report(self, server_round: int) -> int | None:
        return self.rejected.get(server_round) or None  # omitted when none
