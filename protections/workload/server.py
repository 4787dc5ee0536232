"""Tell clients which workload to run and report the simulated round time (protections/workload/wire.py).

Clients scale their own local steps (they know their capability from their node config; the
server learns it only from the metrics they report), so no extra message round is needed to
ask each node for its properties before a round.
"""

from __future__ import annotations

from protections.workload.wire import (
    COMPUTE_METRIC,
    FULL_STEPS_METRIC,
    STEPS_METRIC,
    WORKLOAD_KEY,
    round_times,
)
from core.result_types import WorkloadReport
from protections.base import StrategyWrapper


class Workload(StrategyWrapper):
    section = "workload"

    def __init__(self, strategy, name: str) -> None:
        super().__init__(strategy)
        if name not in ("uniform", "capability"):
            raise ValueError(f"workload={name!r}: use uniform or capability")
        self.name = name
        self._reports: dict[int, WorkloadReport] = {}

    def __repr__(self) -> str:
        return f"Workload({self.name}, {self.strategy!r})"

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config[WORKLOAD_KEY] = self.name
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        clients = []
        for _, res in results:
            m = res.metrics
            if all(k in m for k in (COMPUTE_METRIC, STEPS_METRIC, FULL_STEPS_METRIC)):
                try:  # client input: a value that is no number is left out, never raised
                    clients.append((float(m[COMPUTE_METRIC]), int(m[STEPS_METRIC]), int(m[FULL_STEPS_METRIC])))
                except (TypeError, ValueError):
                    continue
        if clients:
            self._reports[server_round] = WorkloadReport(
                name=self.name,
                **round_times(clients),
                steps=[s for _, s, _ in clients],
                compute=[c for c, _, _ in clients],
            )
        return super().aggregate_fit(server_round, results, failures)

    def report(self, server_round: int) -> WorkloadReport | None:
        return self._reports.get(server_round)
