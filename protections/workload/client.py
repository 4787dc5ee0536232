"""Client half of the workload protocol (protections/workload/wire.py): a pipeline step
(protections/client_step.py) that scales this round's local steps to the node's capability
when the server's Workload layer (protections/workload/server.py) asks for `capability`, and
reports the capability and the full step count its round-time model reads."""

from __future__ import annotations

from flwr.common import NDArrays

from protections.client_step import ClientStep, RoundContext
from protections.workload.wire import (
    COMPUTE_METRIC,
    FULL_STEPS_METRIC,
    WORKLOAD_KEY,
    full_local_steps,
    scaled_steps,
)


class ScaleLocalWork(ClientStep):
    def __init__(self, compute: float) -> None:
        self.compute = compute  # this node's capability in (0, 1] (wire.node_capability)

    def __repr__(self) -> str:
        return f"ScaleLocalWork({self.compute})"

    def receive(self, parameters: NDArrays, ctx: RoundContext) -> NDArrays:
        if not ctx.fitting:
            return parameters
        t = ctx.training
        full_steps = full_local_steps(len(ctx.data), t.local_epochs, t.batch_size)
        if ctx.config.get(WORKLOAD_KEY, "uniform") == "capability":
            ctx.max_steps = scaled_steps(full_steps, self.compute)
        ctx.metrics.update({COMPUTE_METRIC: self.compute, FULL_STEPS_METRIC: full_steps})
        return parameters
