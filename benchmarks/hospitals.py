"""Three hospitals, four ways of training, side by side in one run: accuracy and AUROC overall
and per site on held-out patients.

    python -m benchmarks.hospitals [--per-site 300] [--rounds 10] [--seeds 3]

Data: tests/support/hospitals.py generates the training file (3 sites, `hospital_id` a, b, c,
hospital b's lactate measured too high, 5% missing values) and a held-out file of other
patients of the same sites. Each site standardizes and imputes with its own statistics
(dataset=tabular's default `standardize=client`, `missing=mean`), in training and at test.

- centralized: the three sites' training splits pooled in one place (what federated training
  approaches at best: the upper bound), trained for as many epochs as the federated model sees
  (rounds x local epochs);
- fedavg: FedAvg over the three sites (strategy.fraction_train=1.0);
- fedavg + client-level DP: privacy=client_fixed (each site's whole update clipped, noise on
  the sum; with 3 sites the noise is a third of each round's signal at z = --noise);
- fedavg + HE: secagg=he (pairwise masks on), decrypted with the run's keys for the test.

The federated runs are the ServerApp's round loop with the real strategy stack and real
clients in this process (tests/support/rounds.py), so the comparison costs seconds, not a Ray
start per run. Prints one table: mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.config import load_config
from core.data import data_spec, load_client_data
from core.data_types import ArraySplit
from core.evaluation import evaluate
from core.models import build_model, get_weights, set_weights
from core.tabular import prediction_file
from core.training import train
from tests.support.hospitals import SITES, hospitals
from tests.support.rounds import in_process_run

FEATURES = "[age,bp,lactate]"
CATEGORICAL = "[{column:ward,categories:[icu,surgery,medicine]},{column:sex,categories:[F,M]}]"


def base_overrides(train_file: Path, rounds: int, seed: int) -> str:
    return (
        f"dataset=tabular dataset.path={train_file} dataset.features={FEATURES} "
        f"dataset.categorical={CATEGORICAL} dataset.label=outcome dataset.missing=mean "
        f"dataset.site_column=hospital_id model=linear strategy.fraction_train=1.0 "
        f"strategy.fraction_evaluate=0.0 num_rounds={rounds} seed={seed}"
    )


def site_tests(folder: Path, seed: int) -> dict[str, Path]:
    test = hospitals(200, seed=1000 + seed)
    files = {}
    for site in SITES:
        files[site] = folder / f"test-{site}.csv"
        test[test["hospital_id"] == site].to_csv(files[site], index=False)
    return files


def scores(model, cfg, tests: dict[str, Path]) -> dict[str, float]:
    """accuracy and AUROC per site (each site's test rows, its own statistics) and overall
    (the three sites' rows together)."""
    out, parts = {}, []
    for site, path in tests.items():
        rows, _, _ = prediction_file(path, cfg.dataset)
        parts.append(rows)
        m = evaluate(model, rows, "classification", torch.device("cpu"))
        out[f"auroc {site}"] = m["auroc"]
    pooled = ArraySplit(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    m = evaluate(model, pooled, "classification", torch.device("cpu"))
    out["accuracy"], out["auroc"] = m["accuracy"], m["auroc"]
    return out


def final_model(run, cfg):
    from protections.he.client import decrypt_model
    from protections.he.context import is_payload, load_context

    arrays = list(run.server.strategy.global_model.arrays(run.server.parameters))
    model = build_model(cfg.model, data_spec(cfg.dataset))
    if is_payload(arrays):
        shapes = [a.shape for a in get_weights(model)]
        noise = cfg.privacy.name == "client_fixed"
        arrays = decrypt_model(load_context(run.path / "keys" / "secret.ctx"), arrays, shapes, allow_noise=noise)
    set_weights(model, [np.asarray(a, np.float32) for a in arrays])
    return model.eval()


def centralized(overrides: str, rounds: int, seed: int):
    cfg = load_config(overrides)
    splits = [load_client_data(cfg.dataset, cfg.partitioner, i, 3, seed)[0] for i in range(3)]
    pooled = ArraySplit(np.concatenate([s.x for s in splits]), np.concatenate([s.y for s in splits]))
    model = build_model(cfg.model, data_spec(cfg.dataset), seed=seed)
    epochs = rounds * cfg.training.local_epochs
    from dataclasses import replace

    train(model, pooled, replace(cfg.training, local_epochs=epochs), "classification", torch.device("cpu"), seed=seed)
    return model.eval(), cfg, None


def federated(overrides: str, work: Path):
    run = in_process_run(overrides, work, num_nodes=3, seed=0).fit()
    cfg = run.cfg
    privacy = run.recorder.record.rounds[-1].privacy
    return final_model(run, cfg), cfg, None if privacy is None else privacy.epsilon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-site", type=int, default=300, help="training patients per hospital")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.3, help="privacy.noise_multiplier of the DP run")
    args = parser.parse_args()
    methods = {
        "centralized (pooled, upper bound)": "",
        "fedavg": "",
        "fedavg + client-level DP": f"privacy=client_fixed privacy.noise_multiplier={args.noise}",
        "fedavg + HE (masks on)": "secagg=he",
    }
    table: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    epsilons: dict[str, list[float]] = {}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    with tempfile.TemporaryDirectory(prefix="hospitals-") as tmp:
        for seed in range(args.seeds):
            folder = Path(tmp) / f"seed{seed}"
            folder.mkdir()
            train_file = folder / "train.csv"
            hospitals(args.per_site, seed=seed).to_csv(train_file, index=False)
            tests = site_tests(folder, seed)
            base = base_overrides(train_file, args.rounds, seed)
            for i, (name, extra) in enumerate(methods.items()):
                started = time.perf_counter()
                if i == 0:
                    model, cfg, eps = centralized(base, args.rounds, seed)
                else:
                    model, cfg, eps = federated(f"{base} {extra}".strip(), folder / f"run{i}")
                seconds[name] += time.perf_counter() - started
                table[name].append(scores(model, cfg, tests))
                if eps is not None:
                    epsilons.setdefault(name, []).append(eps)
    keys = ["accuracy", "auroc", *[f"auroc {s}" for s in SITES]]
    print(f"{len(SITES)} hospitals x {args.per_site} training patients, 200 held out per site; "
          f"{args.rounds} rounds; mean ± sd over {args.seeds} seeds")  # fmt: skip
    print("| method | " + " | ".join(keys) + " | epsilon (delta 1e-5) | s per run |")
    print("| --- |" + " --- |" * (len(keys) + 2))
    for name, runs in table.items():
        cells = []
        for k in keys:
            values = [r[k] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        eps = f"{statistics.mean(epsilons[name]):.1f}" if name in epsilons else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {eps} | {seconds[name] / args.seeds:.1f} |")


if __name__ == "__main__":
    main()
