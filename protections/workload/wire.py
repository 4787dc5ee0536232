"""Capability-aware local work (`workload=capability`) and the simulated round-time model.

Each SuperNode declares its compute capability c in (0, 1] in its node config
(`--node-config "... compute=0.25"`: a quarter of a full-speed node); in simulation, where
Flower's node config carries only the partition, node i gets `workload.capabilities[i % k]`.

With `workload=capability` the server's instructions tell every sampled client to scale its
local work to its capability: it runs round(c * S) optimizer steps instead of its full
S = local_epochs * ceil(examples / batch_size) (at least one). With `uniform` it runs S.

Time model (simulated, not measured; the simulation runs every client on the same CPU):
a node with capability c completes c optimizer steps per time unit, where one unit is one step
of a full-speed node; transfer time is ignored. Rounds are synchronous, so a round lasts as long
as its slowest sampled client: T = max_i steps_i / c_i. Every round reports T and what the same
clients would have taken under the uniform workload, T_uniform = max_i S_i / c_i.
"""

from __future__ import annotations

import math

WORKLOAD_KEY = "workload"  # fit-config key: uniform | capability
COMPUTE_NODE_KEY = "compute"  # node-config key: this node's capability in (0, 1]
# Fit metrics every client reports (the server's round-time model reads them).
COMPUTE_METRIC = "compute"
STEPS_METRIC = "steps"
FULL_STEPS_METRIC = "full_steps"


def node_capability(node_config: dict, capabilities: list[float], partition_id: int) -> float:
    """This node's declared capability, else (simulation) the configured distribution's."""
    if COMPUTE_NODE_KEY in node_config:
        value = float(node_config[COMPUTE_NODE_KEY])
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"node config {COMPUTE_NODE_KEY}={value}: a capability must be in (0, 1] "
                "(1: a full-speed node)"
            )
        return value
    return float(capabilities[partition_id % len(capabilities)])


def full_local_steps(num_examples: int, local_epochs: int, batch_size: int) -> int:
    return local_epochs * math.ceil(num_examples / batch_size)


def scaled_steps(full_steps: int, compute: float) -> int:
    return max(1, round(compute * full_steps))


def round_times(clients: list[tuple[float, int, int]]) -> dict[str, float]:
    """(compute, steps run, full steps) of each client -> simulated round times."""
    return {
        "round_time": max(steps / c for c, steps, _ in clients),
        "round_time_uniform": max(full / c for c, _, full in clients),
    }
