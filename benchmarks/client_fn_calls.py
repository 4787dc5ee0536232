"""Per-call cost of `client_fn` (app/client_app.py) in one process, as a simulation's Ray
worker or a long-lived ClientApp process calls it for every message.

    python -m benchmarks.client_fn_calls [--calls 20] [--overrides "model=cnn"]

Cycles over 4 partitions. Prints the first call (imports, config validation, model build and
data load from cold), then the median and mean of the calls after every partition's data is
loaded once (core/data.py caches it): what each further message costs. Each call builds the
client only, no training.
"""

from __future__ import annotations

import argparse
import statistics
import time



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--overrides", default="")
    args = parser.parse_args()

    from flwr.common import Context, RecordDict

    from app.client_app import client_fn

    times = []
    partitions = 4
    for i in range(args.calls + partitions):
        context = Context(
            run_id=1,
            node_id=i % 4,
            node_config={"partition-id": i % partitions, "num-partitions": partitions},
            state=RecordDict(),
            run_config={"overrides": args.overrides},
        )
        start = time.perf_counter()
        client_fn(context)
        times.append(time.perf_counter() - start)
    rest = times[partitions:]
    print(
        f"overrides={args.overrides!r}: first call {times[0] * 1e3:.1f} ms; next {len(rest)}: "
        f"median {statistics.median(rest) * 1e3:.1f} ms, mean {statistics.mean(rest) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
