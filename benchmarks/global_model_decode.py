"""What decoding the global model costs the server per round, at 1M parameters.

The round loop hands one `Parameters` object (the global model, as it crosses the wire) to
`configure_fit`, centralized `evaluate` and the checkpoint. The layers that compare updates
with it (validation, compression, DP) and Flower's FedAvg.evaluate each decoded it with
`parameters_to_ndarrays`; protections/base.py `GlobalModel` now decodes it once per round for
all of them. This script times the server's share of a round that touches the global model
(configure_fit of the configured stack, evaluate, the checkpoint's arrays) and one decode.

    python -m benchmarks.global_model_decode [--overrides "privacy=server_fixed compression=fp16"]

It runs unchanged on a tree without GlobalModel (then the checkpoint decodes by itself, as
app/experiment_server.py did), so the two trees can be compared. The evaluation function
returns a constant: what is timed is the decoding around it, not a model's forward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from app.config import load_config
from strategies.factory import build_strategy


class IdleNode(ClientProxy):
    """A registered node; configure_fit only samples it (no call reaches it)."""

    def get_properties(self, ins, timeout, group_id):
        raise RuntimeError("not called")

    get_parameters = fit = evaluate = reconnect = get_properties


def model(num_values: int, seed: int) -> list[np.ndarray]:
    """float32 tensors of a small MLP's shapes, `num_values` values in all."""
    rng = np.random.default_rng(seed)
    hidden = num_values // 1000
    shapes = [(hidden, 784), (hidden,), (num_values - hidden * 785,)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def server_round(stack, manager, parameters, server_round: int) -> None:
    stack.configure_fit(server_round, parameters, manager)
    stack.evaluate(server_round, parameters)
    shared = getattr(stack, "global_model", None)
    if shared is not None:
        shared.arrays(parameters)  # the checkpoint's arrays (app/experiment_server.py)
    else:
        parameters_to_ndarrays(parameters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overrides", default="privacy=server_fixed compression=fp16")
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    cfg = load_config(f"{args.overrides} strategy.fraction_train=1.0 strategy.min_train_clients=2")
    manager = SimpleClientManager()
    for i in range(10):
        manager.register(IdleNode(str(i)))
    initial = ndarrays_to_parameters(model(args.parameters, 0))
    stack = build_strategy(cfg, initial, lambda r, weights, config: (0.0, {}))
    times = []
    for r in range(1, args.rounds + 1):
        parameters = ndarrays_to_parameters(model(args.parameters, r))  # a new global model
        start = time.perf_counter()
        server_round(stack, manager, parameters, r)
        times.append(time.perf_counter() - start)
    one = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        parameters_to_ndarrays(initial)
        one.append(time.perf_counter() - start)
    print(
        f"{args.parameters} parameters, {args.overrides!r}: server time per round touching the "
        f"global model {statistics.median(times) * 1e3:.2f} ms (median of {args.rounds}); "
        f"one parameters_to_ndarrays {statistics.median(one) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
