"""What a fresh ClientApp process imports for a configuration: the probe that
tests/test_imports.py and `python -m benchmarks.client_import` run in a new `python -c`.

A deployed SuperNode starts one `flwr-clientapp` process per message, so every module the
first `client_fn` call imports is paid on every message. The probe imports `app.client_app`,
calls `client_fn` once with the scenario's node config, optionally runs one `fit` on the
model's own weights, and prints one JSON line: the seconds of each phase, which HEAVY modules
are in `sys.modules` after each phase, and the fit's returned shapes and example count.

The probe is a source string run with `cwd` set to a project tree (this worktree or a copy
of another branch's tree), so the same probe measures an old tree that lacks this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Top-level packages that cost a cold start and that a client should import only when its
# configuration uses them.
HEAVY = (
    "tenseal", "opacus", "ray", "datasets", "pandas", "pyarrow", "sklearn", "scipy",
    "matplotlib", "hydra", "flwr_datasets", "mlflow",
)  # fmt: skip

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import app.client_app as ca
t1 = time.perf_counter()
from flwr.common import Context, RecordDict
heavy = HEAVY_NAMES
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
after_import = loaded()
node_config = json.loads(sys.argv[1])
ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={"overrides": sys.argv[2]},
              node_config=node_config)
client = ca.client_fn(ctx)
t2 = time.perf_counter()
after_client_fn = loaded()
out = {"import_s": t1 - t0, "client_fn_s": t2 - t1, "after_import": after_import,
       "after_client_fn": after_client_fn}
if sys.argv[3] == "fit":
    from core.models import get_weights
    nc = client.numpy_client
    weights = get_weights(nc.model)
    new, n, metrics = nc.fit(weights, {"server_round": 1})
    out["fit_s"] = time.perf_counter() - t2
    out["sent_shapes"] = [list(w.shape) for w in weights]
    out["fit_shapes"] = [list(w.shape) for w in new]
    out["fit_examples"] = n
    out["fit_changed"] = bool(any((a != b).any() for a, b in zip(weights, new)))
    out["after_fit"] = loaded()
print("PROBE " + json.dumps(out))
""".replace("HEAVY_NAMES", repr(HEAVY))


@dataclass(frozen=True)
class Scenario:
    name: str
    overrides: str
    node_config: dict  # "{file}" in a value: the digits-shaped file written for the run
    file_suffix: str | None = None  # .npz | .csv: the site's own data file


SCENARIOS = (
    Scenario("simulation (partition-id)", "", {"partition-id": 0, "num-partitions": 4}),
    Scenario("site data-path .npz", "", {"data-path": "{file}"}, ".npz"),
    Scenario("site data-path .csv", "", {"data-path": "{file}"}, ".csv"),
    Scenario("site .npz, privacy=dpsgd", "privacy=dpsgd", {"data-path": "{file}"}, ".npz"),
    Scenario("site .npz, secagg=he", "secagg=he", {"data-path": "{file}"}, ".npz"),
)


def write_site_file(path: Path, n: int = 60, seed: int = 0) -> Path:
    """A digits-shaped site file (64 features in 0..1, labels 0..9), made with numpy alone so
    writing it imports nothing the probe looks for."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=n)
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
    else:
        np.savetxt(path, np.column_stack([x, y]), delimiter=",", fmt="%.6g",
                   header=",".join([f"f{i}" for i in range(64)] + ["label"]), comments="")  # fmt: skip
    return path


def run_probe(
    tree: Path, scenario: Scenario, work: Path, fit: bool = False, timeout: float = 300
) -> dict:
    """One fresh process in `tree` for `scenario`; returns the probe's JSON."""
    node_config = dict(scenario.node_config)
    if scenario.file_suffix:
        site = write_site_file(work / f"site{scenario.file_suffix}")
        node_config = {k: (str(site) if v == "{file}" else v) for k, v in node_config.items()}
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(node_config), scenario.overrides,
         "fit" if fit else "nofit"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"probe {scenario.name} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("PROBE "):])
