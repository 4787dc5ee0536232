"""Data sets and their federated partitioning (task code shared by ServerApp and ClientApp).

Local data sets (no network): scikit-learn's `digits` and `breast_cancer`, which ship inside
the package, and a generated `linear` regression. They become a `datasets.Dataset` that
Flower Datasets' partitioners split across clients, exactly as `FederatedDataset` does for hub
data sets (`mnist`, `cifar10`, behind `dataset=` and needing the network).

Splits, all derived from `seed` so that every process computes the same ones:
- the server holds a stratified `test_fraction` of the data set for centralized evaluation
  (hub data sets: their own `test` split);
- with `public_fraction` > 0, a stratified share of the rest is a public split that no client
  holds: `python -m app.pretrain` trains the pretrained checkpoint on it;
- the rest is the clients' pool, partitioned by the configured partitioner into
  `num_partitions` parts; each client splits its part into train and `val_fraction` validation.

Feature scaling is treated as public knowledge fixed before federation (digits: pixel range
0..16; breast_cancer: per-feature mean/std of the whole public data set), so every client and
the server scale identically without exchanging statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.config import DatasetConfig, PartitionerConfig

FEATURES = "x"
LABEL = "label"
SAMPLE_ID = "sample_id"  # row index in the full local data set: lets tests check disjointness
# Node config key (deployment): a site's own data file instead of a partition of the data set.
NODE_DATA_PATH = "data-path"


class DatasetUnavailableError(RuntimeError):
    """A hub data set could not be loaded (typically: no network and nothing cached)."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data."""

    task: str  # classification | regression
    num_features: int
    num_outputs: int  # classes, or 1 for regression
    image_shape: tuple[int, ...] | None = None  # (C, H, W) when features are images


@dataclass(frozen=True)
class ArraySplit:
    x: np.ndarray  # float32 (n, num_features)
    y: np.ndarray  # int64 (n,) for classification, float32 (n, 1) for regression

    def __len__(self) -> int:
        return len(self.y)


# --------------------------------------------------------------------------- public API
def data_spec(cfg: DatasetConfig) -> DataSpec:
    if cfg.source == "hub":
        return _hub(cfg, 1, PartitionerConfig(), 0)[0]
    return _local_pool_and_test(cfg, 0)[0]


def centralized_test_split(cfg: DatasetConfig, seed: int) -> ArraySplit:
    """The server's held-out test split."""
    if cfg.source == "hub":
        _, fds = _hub(cfg, 1, PartitionerConfig(), seed)
        return _hub_to_arrays(cfg, fds.load_split("test"))
    _, _, test = _local_pool_and_test(cfg, seed)
    return _to_arrays(test, cfg.task)


def public_split(cfg: DatasetConfig, seed: int) -> ArraySplit:
    """The public split (`dataset.public_fraction` of the non-test data) that no client holds."""
    if cfg.source == "hub" or cfg.public_fraction <= 0:
        raise ValueError(
            "a public split needs a local data set and dataset.public_fraction > 0 "
            "(e.g. dataset.public_fraction=0.2)"
        )
    return _to_arrays(_local_split_public(_key(cfg), seed)[3], cfg.task)


def load_client_data(
    cfg: DatasetConfig,
    part_cfg: PartitionerConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> tuple[ArraySplit, ArraySplit]:
    """One client's (train, validation) splits of its partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{num_partitions - 1} "
            f"(num-partitions={num_partitions}): check the SuperNode's --node-config"
        )
    check_partition_count(cfg, num_partitions, seed)
    return _client_data_cached(_key(cfg), _key(part_cfg), partition_id, num_partitions, seed)


def client_pool_size(cfg: DatasetConfig, seed: int) -> int | None:
    """Examples in the clients' pool of a local data set (None for hub data sets)."""
    return None if cfg.source == "hub" else len(_local_cached(_key(cfg), seed)[1])


def check_partition_count(cfg: DatasetConfig, num_partitions: int, seed: int) -> None:
    """Every partition needs at least one example: more SuperNodes than the pool has
    examples is a clear error, not the partitioner's IndexError."""
    pool = client_pool_size(cfg, seed)
    if pool is not None and num_partitions > pool:
        raise ValueError(
            f"{num_partitions} partitions (one per SuperNode) but dataset={cfg.name} has "
            f"{pool} examples for the clients: every SuperNode needs at least one. Use at "
            f"most {pool} SuperNodes (simulation.num_supernodes / --federation-config "
            "'num-supernodes=...')"
        )


def partition_arrays(
    cfg: DatasetConfig,
    part_cfg: PartitionerConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
) -> ArraySplit:
    """One client's whole partition (before its validation split), as arrays: what
    `python -m app.deploy export-data` writes to a site's data file."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition {partition_id} is outside 0..{num_partitions - 1}")
    check_partition_count(cfg, num_partitions, seed)
    if cfg.source == "hub":
        _, fds = _hub(cfg, num_partitions, part_cfg, seed)
        return _hub_to_arrays(cfg, fds.load_partition(partition_id, "train"))
    partitioner = _partitioner(_key(cfg), _key(part_cfg), num_partitions, seed)
    return _to_arrays(partitioner.load_partition(partition_id), cfg.task)


def load_file_data(path: str | Path, cfg: DatasetConfig, seed: int) -> tuple[ArraySplit, ArraySplit]:
    """A site's own data file as (train, validation) splits: what a SuperNode with
    `--node-config "data-path=..."` trains on instead of a partition.

    Formats: `.npz` with arrays `x` (n, features) and `y` (n,); `.csv` with one sample per
    row, the features first and the label last (a non-numeric first line is a header). The
    features must be scaled as the configured data set's (see the module docstring): the
    server evaluates the model on its own split of that data set. The validation split
    (`val_fraction`) is a seeded random subset of the file's rows."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data-path {path} is not a file: check the SuperNode's --node-config")
    spec = data_spec(cfg)
    if path.suffix == ".npz":
        with np.load(path) as stored:
            missing = {"x", "y"} - set(stored.files)
            if missing:
                raise ValueError(f"{path} lacks the arrays {sorted(missing)}: store x and y")
            x, y = np.asarray(stored["x"]), np.asarray(stored["y"])
    elif path.suffix == ".csv":
        with path.open() as f:
            first = f.readline().split(",")
        try:
            [float(v) for v in first]
            header = 0
        except ValueError:
            header = 1
        table = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2)
        x, y = table[:, :-1], table[:, -1]
    else:
        raise ValueError(f"data-path {path}: use a .npz (arrays x, y) or a .csv file")
    x = x.reshape(len(x), -1).astype(np.float32)
    if x.shape[1] != spec.num_features or len(y) != len(x) or len(x) == 0:
        raise ValueError(
            f"{path} holds x of shape {x.shape} and {len(y)} labels; dataset={cfg.name} needs "
            f"(n, {spec.num_features}) features and n labels, n >= 1"
        )
    if spec.task == "classification":
        if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= spec.num_outputs:
            raise ValueError(
                f"{path}: labels must be integers in 0..{spec.num_outputs - 1} for "
                f"dataset={cfg.name}, found {y.min()}..{y.max()}"
            )
        y = y.astype(np.int64).reshape(-1)
    else:
        y = y.astype(np.float32).reshape(-1, 1)
    n_val = 0 if cfg.val_fraction == 0 else min(math.ceil(cfg.val_fraction * len(y)), len(y) - 1)
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = order[:n_val], order[n_val:]
    return ArraySplit(x[train], y[train]), ArraySplit(x[val], y[val])


def partition_layout(
    cfg: DatasetConfig, part_cfg: PartitionerConfig, num_partitions: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(sample ids per partition, labels per partition, test sample ids) of a local data set:
    what the partitioner produced, for inspection and tests."""
    partitioner = _partitioner(_key(cfg), _key(part_cfg), num_partitions, seed)
    parts = [partitioner.load_partition(i).with_format("numpy") for i in range(num_partitions)]
    _, _, test = _local_pool_and_test(cfg, seed)
    return (
        [np.asarray(p[SAMPLE_ID]) for p in parts],
        [np.asarray(p[LABEL]) for p in parts],
        np.asarray(test.with_format("numpy")[SAMPLE_ID]),
    )


# --------------------------------------------------------------------------- internals
def _key(cfg) -> tuple:
    """Hashable cache key for a config dataclass (its type and field values)."""
    return (type(cfg),) + tuple(
        tuple(v) if isinstance(v, list) else v for v in vars(cfg).values()
    )


def _from_key(key: tuple):
    cls, *values = key
    return cls(*[list(v) if isinstance(v, tuple) else v for v in values])


def _load_local_arrays(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    if cfg.name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)
        y = bunch.target.astype(np.int64)
        return x, y, DataSpec("classification", 64, 10, (1, 8, 8))
    if cfg.name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = bunch.data
        x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
        y = bunch.target.astype(np.int64)
        return x, y, DataSpec("classification", x.shape[1], 2)
    if cfg.name == "linear":
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1.0, 1.0, size=(cfg.n_samples, 1))
        y = cfg.slope * x + cfg.intercept + rng.normal(0.0, cfg.noise_std, size=x.shape)
        return x.astype(np.float32), y.astype(np.float32), DataSpec("regression", 1, 1)
    raise ValueError(
        f"dataset.name={cfg.name!r} is not a local data set: use digits, breast_cancer or "
        "linear, or set dataset.source=hub with dataset.hub_name"
    )


@lru_cache(maxsize=8)
def _local_cached(cfg_key: tuple, seed: int):
    """(spec, clients' pool, test split): the pool excludes the public split."""
    return _local_split_public(cfg_key, seed)[:3]


@lru_cache(maxsize=8)
def _local_split_public(cfg_key: tuple, seed: int):
    import datasets

    datasets.disable_progress_bars()  # one bar per split and client would drown the round log

    cfg: DatasetConfig = _from_key(cfg_key)
    x, y, spec = _load_local_arrays(cfg, seed)
    if spec.task == "classification":
        features = datasets.Features(
            {
                FEATURES: datasets.Sequence(datasets.Value("float32")),
                LABEL: datasets.ClassLabel(num_classes=spec.num_outputs),
                SAMPLE_ID: datasets.Value("int64"),
            }
        )
        ids = np.arange(len(y))
        full = datasets.Dataset.from_dict({FEATURES: x, LABEL: y, SAMPLE_ID: ids}, features=features)
        split = full.train_test_split(
            test_size=cfg.test_fraction, seed=seed, stratify_by_column=LABEL
        )
    else:
        full = datasets.Dataset.from_dict({FEATURES: x, LABEL: y, SAMPLE_ID: np.arange(len(y))})
        split = full.train_test_split(test_size=cfg.test_fraction, seed=seed)
    pool, public = split["train"], None
    if cfg.public_fraction > 0:
        stratify = {"stratify_by_column": LABEL} if spec.task == "classification" else {}
        parts = pool.train_test_split(test_size=cfg.public_fraction, seed=seed + 1, **stratify)
        pool, public = parts["train"], parts["test"]
    return spec, pool, split["test"], public


def _local_pool_and_test(cfg: DatasetConfig, seed: int):
    return _local_cached(_key(cfg), seed)


def _make_partitioner(part_cfg: PartitionerConfig, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if part_cfg.name == "iid":
        # IidPartitioner shards contiguously; the pool is already shuffled by the seeded split.
        return IidPartitioner(num_partitions=num_partitions)
    if part_cfg.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=part_cfg.alpha,
            min_partition_size=part_cfg.min_partition_size,
            self_balancing=part_cfg.self_balancing,
            seed=seed,
        )
    if part_cfg.name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            num_classes_per_partition=part_cfg.classes_per_partition,
            # every class goes to at least one client (random assignment can drop a class)
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    raise ValueError(f"partitioner.name={part_cfg.name!r}: use iid, dirichlet or pathological")


@lru_cache(maxsize=8)
def _partitioner(cfg_key: tuple, part_key: tuple, num_partitions: int, seed: int):
    cfg: DatasetConfig = _from_key(cfg_key)
    partitioner = _make_partitioner(_from_key(part_key), num_partitions, seed)
    _, pool, _ = _local_cached(cfg_key, seed)
    partitioner.dataset = pool
    return partitioner


@lru_cache(maxsize=64)
def _client_data_cached(
    cfg_key: tuple, part_key: tuple, partition_id: int, num_partitions: int, seed: int
) -> tuple[ArraySplit, ArraySplit]:
    cfg: DatasetConfig = _from_key(cfg_key)
    if cfg.source == "hub":
        _, fds = _hub(cfg, num_partitions, _from_key(part_key), seed)
        partition = fds.load_partition(partition_id, "train")
        to_arrays = lambda ds: _hub_to_arrays(cfg, ds)  # noqa: E731
    else:
        partition = _partitioner(cfg_key, part_key, num_partitions, seed).load_partition(
            partition_id
        )
        to_arrays = lambda ds: _to_arrays(ds, cfg.task)  # noqa: E731
    if cfg.val_fraction == 0 or len(partition) < 2:
        train = to_arrays(partition)
        return train, ArraySplit(train.x[:0], train.y[:0])
    split = partition.train_test_split(test_size=cfg.val_fraction, seed=seed + partition_id)
    return to_arrays(split["train"]), to_arrays(split["test"])


def _to_arrays(ds, task: str) -> ArraySplit:
    ds = ds.with_format("numpy")
    x = np.asarray(ds[FEATURES], dtype=np.float32)
    if task == "classification":
        y = np.asarray(ds[LABEL], dtype=np.int64)
    else:
        y = np.asarray(ds[LABEL], dtype=np.float32).reshape(-1, 1)
    return ArraySplit(x, y)


# --------------------------------------------------------------------------- hub data sets
@lru_cache(maxsize=4)
def _hub_cached(cfg_key: tuple, num_partitions: int, part_key: tuple, seed: int):
    from flwr_datasets import FederatedDataset

    cfg: DatasetConfig = _from_key(cfg_key)
    partitioner = _make_partitioner(_from_key(part_key), num_partitions, seed)
    fds = FederatedDataset(
        dataset=cfg.hub_name, partitioners={"train": partitioner}, shuffle=True, seed=seed
    )
    try:
        test = fds.load_split("test")
    except Exception as err:  # network, DNS, missing cache: all surface differently
        raise DatasetUnavailableError(
            f"Could not load the hub data set {cfg.hub_name!r} (dataset={cfg.name}): "
            f"{type(err).__name__}: {err}. Hub data sets need the network on first use "
            "(later runs read the Hugging Face cache). Without network, use a data set that "
            "ships with the code: dataset=digits, dataset=breast_cancer or dataset=linear."
        ) from err
    first = np.asarray(test[0][cfg.feature_key], dtype=np.float32)
    shape = first.shape if first.ndim == 3 else (1, *first.shape)
    if first.ndim == 3 and shape[-1] in (1, 3):  # HWC images -> CHW
        shape = (shape[-1], shape[0], shape[1])
    num_classes = test.features[cfg.label_key].num_classes
    spec = DataSpec("classification", int(np.prod(shape)), num_classes, tuple(shape))
    return spec, fds


def _hub(cfg: DatasetConfig, num_partitions: int, part_cfg: PartitionerConfig, seed: int):
    return _hub_cached(_key(cfg), num_partitions, _key(part_cfg), seed)


def _hub_to_arrays(cfg: DatasetConfig, ds) -> ArraySplit:
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    images = np.stack([np.asarray(img, dtype=np.float32) for img in ds[cfg.feature_key]])
    if images.ndim == 4:  # N, H, W, C -> N, C, H, W
        images = images.transpose(0, 3, 1, 2)
    x = (images / 255.0).reshape(len(images), -1).astype(np.float32)
    return ArraySplit(x, np.asarray(ds[cfg.label_key], dtype=np.int64))
