"""Partition loading and the server's test split: the row-by-row path vs the bulk numpy path,
side by side in one run.

    python -m benchmarks.data_path                       # digits and linear (125,000 samples)
    python -m benchmarks.data_path --partitions 10 100 --rounds 3

The old path is kept here, and only here, for the comparison: the local data set in a
`datasets.Dataset` with its features, Flower Datasets' partitioner over the pool, each
client's `train_test_split`, every column converted row by row (`np.asarray(ds[col])` over a
`datasets` Column), behind a 64-entry cache of converted partitions per process. The new
path is the product's `core.data`.

What one process (a Ray actor, a SuperNode) pays:
- setup: the data set and its seeded splits, once per process (caches cleared first);
- round 1: every partition 0..N-1 loaded once, first touch;
- round k > 1: the same again; the old cache only hits while N <= 64.
- the server's test split, cold (setup included), as the ServerApp pays it at start.
Every partition the two paths load is checked to be identical (values, order, dtypes).
Ratios are old / new (> 1: the new path is faster). Timings are wall clock on a shared
machine: compare the columns of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import lru_cache


import numpy as np

import core.data as new
from app.config import load_config
from core.data import (
    FEATURES,
    LABEL,
    SAMPLE_ID,
    ArraySplit,
    _from_key,
    _key,
    _load_local_arrays,
    _make_partitioner,
)


# --------------------------------------------------------------- the old path (for comparison)
@lru_cache(maxsize=8)
def _old_local(cfg_key: tuple, seed: int):
    import datasets

    datasets.disable_progress_bars()
    cfg = _from_key(cfg_key)
    x, y, spec = _load_local_arrays(cfg, seed)
    columns = {FEATURES: x, LABEL: y, SAMPLE_ID: np.arange(len(y))}
    if spec.task == "classification":
        features = datasets.Features(
            {
                FEATURES: datasets.Sequence(datasets.Value("float32")),
                LABEL: datasets.ClassLabel(num_classes=spec.num_outputs),
                SAMPLE_ID: datasets.Value("int64"),
            }
        )
        full = datasets.Dataset.from_dict(columns, features=features)
        split = full.train_test_split(
            test_size=cfg.test_fraction, seed=seed, stratify_by_column=LABEL
        )
    else:
        full = datasets.Dataset.from_dict(columns)
        split = full.train_test_split(test_size=cfg.test_fraction, seed=seed)
    return spec, split["train"], split["test"]


@lru_cache(maxsize=8)
def _old_partitioner(cfg_key: tuple, part_key: tuple, num_partitions: int, seed: int):
    partitioner = _make_partitioner(_from_key(part_key), num_partitions, seed)
    partitioner.dataset = _old_local(cfg_key, seed)[1]
    return partitioner


def _old_to_arrays(ds, task: str) -> ArraySplit:
    ds = ds.with_format("numpy")
    x = np.asarray(ds[FEATURES], dtype=np.float32)
    if task == "classification":
        return ArraySplit(x, np.asarray(ds[LABEL], dtype=np.int64))
    return ArraySplit(x, np.asarray(ds[LABEL], dtype=np.float32).reshape(-1, 1))


@lru_cache(maxsize=64)
def _old_client_data(cfg_key: tuple, part_key: tuple, pid: int, num_partitions: int, seed: int):
    cfg = _from_key(cfg_key)
    partition = _old_partitioner(cfg_key, part_key, num_partitions, seed).load_partition(pid)
    if cfg.val_fraction == 0 or len(partition) < 2:
        train = _old_to_arrays(partition, cfg.task)
        return train, ArraySplit(train.x[:0], train.y[:0])
    split = partition.train_test_split(test_size=cfg.val_fraction, seed=seed + pid)
    return _old_to_arrays(split["train"], cfg.task), _old_to_arrays(split["test"], cfg.task)


def _old_test_split(cfg_key: tuple, seed: int) -> ArraySplit:
    return _old_to_arrays(_old_local(cfg_key, seed)[2], _from_key(cfg_key).task)


def _clear_old() -> None:
    for f in (_old_local, _old_partitioner, _old_client_data):
        f.cache_clear()


def _clear_new() -> None:
    for f in (new._local_cached, new._layout):
        f.cache_clear()


# --------------------------------------------------------------------------- measurement
def _same(a: ArraySplit, b: ArraySplit) -> bool:
    return (
        a.x.dtype == b.x.dtype
        and a.y.dtype == b.y.dtype
        and a.y.shape == b.y.shape
        and len(a) == len(b)
        and np.array_equal(a.x.ravel(), b.x.ravel())  # empty: the old path's shape is (0,)
        and np.array_equal(a.y, b.y)
    )


def _partition_run(cfg, num_partitions: int, rounds: int, seed: int) -> dict[str, list[float]]:
    """Seconds for setup and for each round, old and new, in one process."""
    ck, pk = _key(cfg.dataset), _key(cfg.partitioner)
    times: dict[str, list[float]] = {"old": [], "new": []}
    loaded: dict[str, list] = {"old": [], "new": []}
    for name in ("old", "new"):
        clear, setup, load = (
            (_clear_old, lambda: _old_local(ck, seed), lambda p: _old_client_data(ck, pk, p, num_partitions, seed))
            if name == "old"
            else (
                _clear_new,
                lambda: new.client_pool_size(cfg.dataset, seed),
                lambda p: new.load_client_data(cfg.dataset, cfg.partitioner, p, num_partitions, seed),
            )
        )  # fmt: skip
        clear()
        start = time.perf_counter()
        setup()
        times[name].append(time.perf_counter() - start)
        for r in range(rounds):
            start = time.perf_counter()
            out = [load(p) for p in range(num_partitions)]
            times[name].append(time.perf_counter() - start)
            if r == 0:
                loaded[name] = out
    for pid, (a, b) in enumerate(zip(loaded["old"], loaded["new"])):
        if len(a[0]) + len(a[1]):  # empty partitions: the old path's (0,) shape differs
            assert _same(a[0], b[0]) and _same(a[1], b[1]), f"partition {pid} differs"
    _clear_old()
    return times


def _test_split_run(cfg, seed: int, repeats: int) -> tuple[float, float, int]:
    ck = _key(cfg.dataset)
    old_t, new_t = [], []
    for _ in range(repeats):
        _clear_old()
        start = time.perf_counter()
        a = _old_test_split(ck, seed)
        old_t.append(time.perf_counter() - start)
        _clear_new()
        start = time.perf_counter()
        b = new.centralized_test_split(cfg.dataset, seed)
        new_t.append(time.perf_counter() - start)
        assert _same(a, b), "test split differs"
    _clear_old()
    return float(np.median(old_t)), float(np.median(new_t)), len(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="test split: median of")
    parser.add_argument("--linear-samples", type=int, default=125_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # partitioners' sampling warnings

    configs = {
        "digits": load_config("dataset=digits"),
        f"linear-{args.linear_samples}": load_config(
            f"dataset=linear model=linear dataset.n_samples={args.linear_samples}"
        ),
    }
    print("Partition loading, one process, every partition once per round (seconds; old/new)")
    header = f"{'data set':<14}{'N':>6}  {'phase':<8}{'old s':>9}{'new s':>9}{'ratio':>9}"
    header += f"{'old ms/part':>13}{'new ms/part':>13}"
    print(header)
    for label, cfg in configs.items():
        pool = new.client_pool_size(cfg.dataset, args.seed)
        for n in args.partitions:
            if n > pool:
                print(f"{label:<14}{n:>6}  skipped: the pool has {pool} examples")
                continue
            t = _partition_run(cfg, n, args.rounds, args.seed)
            for i, phase in enumerate(["setup"] + [f"round {r + 1}" for r in range(args.rounds)]):
                o, w = t["old"][i], t["new"][i]
                per = "" if i == 0 else f"{1e3 * o / n:>13.3f}{1e3 * w / n:>13.3f}"
                print(f"{label:<14}{n:>6}  {phase:<8}{o:>9.3f}{w:>9.3f}{o / w:>9.2f}{per}")
    print()
    print(f"Server test split, cold (setup included; median of {args.repeats})")
    print(f"{'data set':<14}{'rows':>8}{'old s':>9}{'new s':>9}{'ratio':>9}")
    for label, cfg in configs.items():
        o, w, rows = _test_split_run(cfg, args.seed, args.repeats)
        print(f"{label:<14}{rows:>8}{o:>9.3f}{w:>9.3f}{o / w:>9.2f}")
    print("\nEvery loaded partition and test split: identical old vs new.")


if __name__ == "__main__":
    main()
