"""Count the bytes of model payloads that cross the wire each round (`comm` in results.json).

bytes_down: the serialized parameter tensors sent to every sampled client (training and
federated evaluation); bytes_up: the tensors every client returned from training. These are
the payload bytes of Flower's messages (NumPy .npy serialization, headers included), not
counting gRPC/protobuf framing.
"""

from __future__ import annotations

from dataclasses import replace

from core.result_types import Comm
from protections.base import StrategyWrapper, payload_bytes


class TrafficMeter(StrategyWrapper):
    """Outermost wrapper: sees exactly what is sent and what comes back."""

    section = "comm"

    def __init__(self, strategy) -> None:
        super().__init__(strategy)

        self._rounds: dict[int, Comm] = {}

    def traffic(self, server_round: int) -> Comm:
        return self._rounds.setdefault(server_round, Comm(bytes_down=0, bytes_up=0))

    def report(self, server_round: int) -> Comm:
        return replace(self.traffic(server_round))  # every round has one (0 when nothing moved)

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.traffic(server_round).bytes_down += sum(
            payload_bytes(ins.parameters) for _, ins in instructions
        )
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        self.traffic(server_round).bytes_up += sum(
            payload_bytes(res.parameters) for _, res in results
        )
        return super().aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        instructions = super().configure_evaluate(server_round, parameters, client_manager)
        self.traffic(server_round).bytes_down += sum(
            payload_bytes(ins.parameters) for _, ins in instructions
        )
        return instructions
