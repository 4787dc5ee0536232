"""Cold start of one ClientApp process per configuration: another tree (default: the main
branch) vs this one, side by side in one run.

    python -m benchmarks.client_import                  # old = main, 3 fresh processes each
    python -m benchmarks.client_import --old REF --repeats 5

A deployed SuperNode starts a fresh `flwr-clientapp` process for every message, so the
imports of `import app.client_app` and of the first `client_fn` call are paid per message.
For each configuration of tests/support/client_import.py (simulation-style partition-id, a
site with its own `data-path` .npz or .csv, that site under privacy=dpsgd or secagg=he) the
probe runs in fresh processes, alternating old and new, and this prints the medians of
`import app.client_app` + first `client_fn` (seconds), old / new (> 1: new is faster), and the
heavy packages each leaves loaded. The old tree is `git archive REF` unpacked into a temp
folder (removed afterwards). Wall clock on a shared machine: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from tests.support.client_import import SCENARIOS, run_probe

ROOT = Path(__file__).resolve().parents[1]


def export_tree(ref: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="main", help="git ref of the old tree")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = export_tree(args.old, Path(tmp) / "old")
        trees = {"old": old_tree, "new": ROOT}
        print(f"old = {args.old}, new = {ROOT}; medians of {args.repeats} fresh processes")
        print(f"{'configuration':28} {'old s':>7} {'new s':>7} {'old/new':>8}  "
              "heavy packages after client_fn: old -> new")  # fmt: skip
        for k, scenario in enumerate(SCENARIOS):
            secs: dict[str, list[float]] = {"old": [], "new": []}
            loaded = {}
            for i in range(args.repeats):
                for side, tree in trees.items():  # alternate: machine noise hits both
                    work = Path(tmp) / f"{side}{k}.{i}"
                    work.mkdir()
                    r = run_probe(tree, scenario, work)
                    secs[side].append(r["import_s"] + r["client_fn_s"])
                    loaded[side] = r["after_client_fn"]
            old, new = statistics.median(secs["old"]), statistics.median(secs["new"])
            print(f"{scenario.name:28} {old:7.2f} {new:7.2f} {old / new:8.2f}  "
                  f"{','.join(loaded['old'])} -> {','.join(loaded['new'])}")  # fmt: skip


if __name__ == "__main__":
    main()
