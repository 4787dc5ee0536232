"""Privacy-utility benchmark on digits: accuracy against epsilon, side by side in one run.

    python -m benchmarks.privacy_utility            # the README's table (about 30 min on 2 cores)
    python -m benchmarks.privacy_utility --quick    # a smoke version (few rounds)

Two Hydra sweeps through the sweep CLI (each job a full `flwr run` simulation):
- client-level DP (`privacy=server_fixed`): 100 SuperNodes, 20 sampled per round, a sweep of
  noise multipliers, with a non-private baseline of the same setting;
- sample-level DP-SGD (`privacy=dpsgd`): 10 SuperNodes, a sweep of per-client target epsilons,
  with a non-private baseline.
It prints a Markdown table (final centralized accuracy and the epsilon the run reported, at
delta = 1e-5), and writes it with a plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

from app.sweep import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"

CLIENT_LEVEL = [
    "model=linear", "simulation.num_supernodes=100", "strategy.fraction_train=0.2",
    "strategy.min_train_clients=20", "strategy.fraction_evaluate=0", "training.local_epochs=5",
    "training.lr=0.1",
]  # fmt: skip
SAMPLE_LEVEL = ["simulation.num_supernodes=10", "strategy.fraction_evaluate=0"]


def sweep(name: str, overrides: list[str], out: Path) -> list[dict]:
    """Run one Hydra sweep; its rows from the sweep's summary.csv."""
    sweep_dir = out / name.replace(" ", "_")
    command = [sys.executable, "-m", "app.sweep", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return read_summary(name, sweep_dir)


def read_summary(name: str, sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / SUMMARY_FILE, newline="") as f:
        return [
            {
                "setting": name,
                "overrides": job["overrides"],
                "epsilon": float(job.get("privacy_epsilon") or "inf"),
                "accuracy": float(job["centralized_accuracy"]),
                "rounds": int(job["rounds_completed"]),
                "seconds": float(job["seconds_total"]),
            }
            for job in csv.DictReader(f)
            if job["status"] == "ok"
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds, two noise levels")
    args = parser.parse_args()
    out = RESULTS / ("quick" if args.quick else "full")
    rounds_cl, rounds_dp = (3, 2) if args.quick else (60, 20)
    noise = "1.0,2.0" if args.quick else "0.5,0.7,1.0,1.5,2.5,6.6"
    targets = "3,8" if args.quick else "1,3,8"
    started = time.perf_counter()
    rows = []
    rows += sweep("client-level baseline", CLIENT_LEVEL + ["privacy=none", f"num_rounds={rounds_cl}"], out)
    rows += sweep(
        "client-level DP",
        CLIENT_LEVEL + ["privacy=server_fixed", "privacy.clipping_norm=0.5",
                        f"privacy.noise_multiplier={noise}", f"num_rounds={rounds_cl}"],
        out,
    )  # fmt: skip
    rows += sweep("sample-level baseline", SAMPLE_LEVEL + ["privacy=none", f"num_rounds={rounds_dp}"], out)
    rows += sweep(
        "sample-level DP-SGD",
        SAMPLE_LEVEL + ["privacy=dpsgd", f"privacy.target_epsilon={targets}", f"num_rounds={rounds_dp}"],
        out,
    )  # fmt: skip

    RESULTS.mkdir(parents=True, exist_ok=True)
    table = out / "privacy_utility.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| setting | overrides | epsilon (delta 1e-5) | accuracy | rounds | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        eps = "inf (no DP)" if r["epsilon"] == float("inf") else f"{r['epsilon']:.2f}"
        print(f"| {r['setting']} | `{r['overrides']}` | {eps} | {r['accuracy']:.3f} | {r['rounds']} | {r['seconds']:.0f} |")
    plot(rows, out / "privacy_utility.png")
    print(f"\nWrote {table} and {out / 'privacy_utility.png'} in {time.perf_counter() - started:.0f} s")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for setting, baseline, marker in (
        ("client-level DP", "client-level baseline", "o-"),
        ("sample-level DP-SGD", "sample-level baseline", "s-"),
    ):
        points = sorted((r["epsilon"], r["accuracy"]) for r in rows if r["setting"] == setting)
        if points:
            line = ax.plot(*zip(*points), marker, label=setting)[0]
            for r in rows:
                if r["setting"] == baseline:
                    ax.axhline(r["accuracy"], ls=":", color=line.get_color(), label=f"{baseline}")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("centralized test accuracy")
    ax.set_title("digits: privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
