"""A simulated round of this project against the same round of a minimal Flower app, side by
side in one go (issue 18's "plain simulated round overhead over a minimal Flower app").

    python -m benchmarks.simulation_overhead [--supernodes 10] [--rounds 6] [--repeats 3]
        [--overrides "..."] [--keep DIR]

Both apps train the same experiment (the default one unless `--overrides`: digits, MLP, FedAvg,
the project's partitions and core/training.py) in Flower's simulation engine, `flwr run` with
N SuperNodes at 1 CPU each, each run in a Flower home of its own that is stopped by PID after
it:
- project: `flwr run .` as a user runs it (no privacy, no secure aggregation: the plain path,
  with this project's server loop, strategy layers, results recorder and checkpoints);
- minimal: benchmarks/minimal_app (Flower's Message API FedAvg, a ClientApp of a few lines, no
  recorder, no checkpoints).
The runs alternate (project, minimal, minimal, project, ...) so that a change in the machine's
load falls on both. Round time is each app's own clock, from the same points: the end of the
previous round's centralized evaluation to the end of this round's (train, federated
evaluation, centralized evaluation; the project also writes its checkpoint and results.json
then, and the time is the one its round line prints). Round 1 carries Ray's start-up and is left out of the means. Prints each run's mean of
rounds 2.., their medians per app and the ratio project / minimal; `--json PATH` writes them.
A benchmark, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path

from benchmarks.deployment_round import MINIMAL_APP, ROOT, base_env, flwr_run
from tests.support.processes import stop_flower

APPS = ("project", "minimal")


ROUND_LINE = re.compile(r"round (\d+)/\d+ .*\(total ([\d.]+) s\)")


def later_round_seconds(app: str, out: Path, log: Path) -> list[float]:
    """Seconds of rounds 2.. of one run, each from the end of the round before to its own."""
    if app == "minimal":  # minimal_server.py: end of round r-1's central evaluation -> round r's
        return [r["seconds"] for r in json.loads((out / "results.json").read_text())["rounds"][1:]]
    # The project's round line (app/experiment_server.py) ends with the time since its first
    # round started, taken after the round's checkpoint and results.json were written.
    ends = {int(m.group(1)): float(m.group(2)) for m in ROUND_LINE.finditer(log.read_text())}
    totals = [ends[r] for r in sorted(ends)]
    return [b - a for a, b in zip(totals, totals[1:])]


def run_once(app: str, work: Path, n: int, rounds: int, overrides: str) -> list[float]:
    home, out = work / "home", work / "out"
    env = base_env(home)
    target = ["--federation-config", f"num-supernodes={n} client-resources-num-cpus=1"]
    common = f"num_rounds={rounds} simulation.num_supernodes={n} {overrides}".strip()
    try:
        if app == "project":
            flwr_run(env, ROOT, target, f'overrides="{common} output_dir={out}"', work / "flwr.log")
        else:
            flwr_run(env, MINIMAL_APP, target,
                     f'overrides="{common}" output-dir="{out}"', work / "flwr.log")  # fmt: skip
    finally:
        stop_flower(home)
    return later_round_seconds(app, out, work / "flwr.log")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each app")
    parser.add_argument("--overrides", default="", help="Hydra overrides for both apps")
    parser.add_argument("--keep", type=Path, help="keep every run's folder under this one")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (round 1 carries Ray's start-up and is left out)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="sim-overhead-"))
    order = [APPS if i % 2 == 0 else APPS[::-1] for i in range(args.repeats)]
    means: dict[str, list[float]] = {a: [] for a in APPS}
    for i, pair in enumerate(order):
        for app in pair:
            seconds = run_once(app, root / f"{app}-{i}", args.supernodes, args.rounds, args.overrides)
            means[app].append(statistics.mean(seconds))
            print(f"{app:<8} run {i}: rounds 2-{args.rounds} "
                  + " ".join(f"{s:.3f}" for s in seconds) + f"  mean {means[app][-1]:.3f} s", flush=True)  # fmt: skip
    median = {a: statistics.median(v) for a, v in means.items()}
    ratio = median["project"] / median["minimal"]
    print(f"\nmedian of run means, rounds 2-{args.rounds}, N={args.supernodes}: "
          f"project {median['project']:.3f} s, minimal {median['minimal']:.3f} s; "
          f"project / minimal = {ratio:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"means": means, "median": median, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
