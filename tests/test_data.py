import math

import numpy as np
import pytest

from app.config import load_config
from core.data import (
    centralized_test_split,
    data_spec,
    load_client_data,
    partition_layout,
)

NUM_PARTITIONS = 10


def layout(overrides: str, num_partitions: int = NUM_PARTITIONS, seed: int = 0):
    cfg = load_config(overrides)
    return cfg, partition_layout(cfg.dataset, cfg.partitioner, num_partitions, seed)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_disjoint_from_the_test_split(partitioner):
    cfg, (ids, _, test_ids) = layout(f"partitioner={partitioner}")
    pooled = np.concatenate(ids)
    assert len(np.unique(pooled)) == len(pooled), "a sample is in two partitions"
    assert not set(pooled) & set(test_ids), "a client holds a server test sample"
    assert len(test_ids) == math.ceil(1797 * cfg.dataset.test_fraction)


def test_iid_partitions_cover_the_pool_with_equal_sizes():
    _, (ids, labels, test_ids) = layout("partitioner=iid")
    sizes = [len(i) for i in ids]
    assert sum(sizes) + len(test_ids) == 1797
    assert max(sizes) - min(sizes) <= 1
    # every client sees every class, in roughly the global proportions
    for part_labels in labels:
        assert len(np.unique(part_labels)) == 10


def _mean_max_class_share(labels: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(l, minlength=10).max() / len(l) for l in labels]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    _, (_, iid_labels, _) = layout("partitioner=iid")
    _, (_, mild, _) = layout("partitioner=dirichlet partitioner.alpha=10")
    _, (_, skewed, _) = layout("partitioner=dirichlet partitioner.alpha=0.1")
    iid, mild, skewed = map(_mean_max_class_share, (iid_labels, mild, skewed))
    assert iid < 0.2  # ~0.1 for balanced classes
    assert skewed > 0.4 and skewed > mild + 0.2


def test_pathological_partitions_hold_only_their_classes():
    _, (_, labels, _) = layout("partitioner=pathological partitioner.classes_per_partition=2")
    for part_labels in labels:
        assert 1 <= len(np.unique(part_labels)) <= 2


def test_partitioning_is_a_function_of_the_seed():
    _, (a, _, _) = layout("partitioner=dirichlet", seed=3)
    _, (b, _, _) = layout("partitioner=dirichlet", seed=3)
    _, (c, _, _) = layout("partitioner=dirichlet", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_client_splits_train_and_validation():
    cfg = load_config("")
    train, val = load_client_data(cfg.dataset, cfg.partitioner, 2, NUM_PARTITIONS, cfg.seed)
    assert len(train) + len(val) in (143, 144)
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=1)
    assert train.x.shape[1] == 64 and train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0


def test_bad_partition_id_names_the_node_config():
    cfg = load_config("")
    with pytest.raises(ValueError, match="node-config"):
        load_client_data(cfg.dataset, cfg.partitioner, 10, NUM_PARTITIONS, cfg.seed)


@pytest.mark.parametrize(
    "dataset,features,outputs,task",
    [("digits", 64, 10, "classification"), ("breast_cancer", 30, 2, "classification"),
     ("linear", 1, 1, "regression")],
)  # fmt: skip
def test_local_data_sets(dataset, features, outputs, task):
    cfg = load_config(f"dataset={dataset} {'model=linear' if dataset == 'linear' else ''}")
    spec = data_spec(cfg.dataset)
    assert (spec.num_features, spec.num_outputs, spec.task) == (features, outputs, task)
    test = centralized_test_split(cfg.dataset, cfg.seed)
    assert test.x.shape[1] == features and len(test) > 0


def test_linear_data_follows_its_generating_line():
    cfg = load_config("dataset=linear model=linear")
    test = centralized_test_split(cfg.dataset, cfg.seed)
    slope, intercept = np.polyfit(test.x[:, 0], test.y[:, 0], 1)
    assert slope == pytest.approx(2.0, abs=0.05) and intercept == pytest.approx(1.0, abs=0.05)


@pytest.mark.integration  # a fresh interpreter with an empty cache and no network
def test_hub_data_set_without_network_fails_clearly(tmp_path):
    """MNIST through Flower Datasets, offline and with an empty cache: a clear error."""
    import subprocess
    import sys

    code = (
        "from app.config import load_config\n"
        "from core.data import centralized_test_split\n"
        "cfg = load_config('dataset=mnist')\n"
        "centralized_test_split(cfg.dataset, 0)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "DatasetUnavailableError" in proc.stderr
    assert "ylecun/mnist" in proc.stderr and "dataset=digits" in proc.stderr


# ----------------------------------------------------------- bulk data path = row-by-row reading
def _reference_splits(cfg, num_partitions: int, seed: int):
    """The data path as it read before the numpy bulk path: the whole data set (features
    included) in a `datasets.Dataset`, the seeded stratified splits, Flower Datasets'
    partitioner, each client's `train_test_split`, and every column converted row by row.
    Returns (test split, public split or None, [(train, val) per partition])."""
    import datasets

    from core.data import FEATURES, LABEL, SAMPLE_ID, ArraySplit, _load_local_arrays, _make_partitioner

    d = cfg.dataset
    x, y, spec = _load_local_arrays(d, seed)
    columns = {FEATURES: x, LABEL: y, SAMPLE_ID: np.arange(len(y))}
    stratify = {}
    if spec.task == "classification":
        features = datasets.Features(
            {
                FEATURES: datasets.Sequence(datasets.Value("float32")),
                LABEL: datasets.ClassLabel(num_classes=spec.num_outputs),
                SAMPLE_ID: datasets.Value("int64"),
            }
        )
        full = datasets.Dataset.from_dict(columns, features=features)
        stratify = {"stratify_by_column": LABEL}
    else:
        full = datasets.Dataset.from_dict(columns)
    split = full.train_test_split(test_size=d.test_fraction, seed=seed, **stratify)
    pool, public = split["train"], None
    if d.public_fraction > 0:
        parts = pool.train_test_split(test_size=d.public_fraction, seed=seed + 1, **stratify)
        pool, public = parts["train"], parts["test"]

    def rows(ds):
        xs = np.array([np.asarray(row, dtype=np.float32) for row in ds[FEATURES]], np.float32)
        xs = xs.reshape(len(ds), x.shape[1])
        ys = [row for row in ds[LABEL]]
        if spec.task == "classification":
            return ArraySplit(xs, np.array(ys, dtype=np.int64))
        return ArraySplit(xs, np.array(ys, np.float32).reshape(-1, 1))

    partitioner = _make_partitioner(cfg.partitioner, num_partitions, seed)
    partitioner.dataset = pool
    clients = []
    for pid in range(num_partitions):
        part = partitioner.load_partition(pid)
        if d.val_fraction == 0 or len(part) < 2:
            clients.append((rows(part), rows(part.select([]))))
        else:
            halves = part.train_test_split(test_size=d.val_fraction, seed=seed + pid)
            clients.append((rows(halves["train"]), rows(halves["test"])))
    return rows(split["test"]), None if public is None else rows(public), clients


def _same(a, b) -> bool:
    return (
        a.x.dtype == b.x.dtype == np.float32
        and a.y.dtype == b.y.dtype
        and a.x.shape == b.x.shape
        and a.y.shape == b.y.shape
        and np.array_equal(a.x, b.x)
        and np.array_equal(a.y, b.y)
    )


@pytest.mark.parametrize(
    "overrides,num_partitions,seed",
    [
        ("partitioner=iid", 7, 0),
        ("partitioner=dirichlet", 7, 3),
        ("partitioner=pathological", 7, 0),
        ("dataset=breast_cancer partitioner=dirichlet partitioner.alpha=1", 5, 1),
        ("dataset=breast_cancer partitioner=pathological partitioner.classes_per_partition=1", 4, 0),
        ("dataset=linear model=linear partitioner=iid", 9, 2),
        ("partitioner=iid dataset.public_fraction=0.2", 6, 0),
        ("partitioner=dirichlet dataset.val_fraction=0", 5, 0),
        ("partitioner=iid dataset.val_fraction=0.35", 11, 4),
    ],
)
def test_bulk_path_returns_the_examples_of_a_row_by_row_reading(overrides, num_partitions, seed):
    """Every client's train and validation rows, the server's test split and the public split:
    the same values, in the same order, with the same dtypes, as converting the partitioner's
    Datasets row by row."""
    from core.data import partition_arrays, public_split

    cfg = load_config(overrides)
    test, public, clients = _reference_splits(cfg, num_partitions, seed)
    assert _same(centralized_test_split(cfg.dataset, seed), test)
    if public is not None:
        assert _same(public_split(cfg.dataset, seed), public)
    for pid, (ref_train, ref_val) in enumerate(clients):
        train, val = load_client_data(cfg.dataset, cfg.partitioner, pid, num_partitions, seed)
        assert len(train) == len(ref_train) > 0
        assert _same(train, ref_train) and _same(val, ref_val), f"partition {pid}"
        whole = partition_arrays(cfg.dataset, cfg.partitioner, pid, num_partitions, seed)
        assert len(whole) == len(ref_train) + len(ref_val)
        assert sorted(map(tuple, whole.x)) == sorted(map(tuple, np.concatenate([ref_train.x, ref_val.x])))


@pytest.mark.parametrize("n", [2, 3, 7, 10, 11, 19, 143, 1000])
@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.5, 0.9])
def test_validation_split_selects_what_train_test_split_selects(n, fraction):
    import datasets

    from core.data import _validation_split

    ds = datasets.Dataset.from_dict({"i": np.arange(n)})
    try:
        halves = ds.train_test_split(test_size=fraction, seed=n + 7)
    except ValueError:  # no training example left: both refuse
        with pytest.raises(ValueError, match="val_fraction"):
            _validation_split(n, fraction, n + 7)
        return
    train, val = _validation_split(n, fraction, n + 7)
    assert np.array_equal(train, halves["train"]["i"]) and np.array_equal(val, halves["test"]["i"])


def test_empty_partitions_keep_the_feature_width():
    """A Dirichlet draw can leave a client with nothing (min_partition_size=0): its arrays are
    (0, features) float32, as a model's input needs, not the (0,) float64 a row-by-row
    conversion of an empty column gave."""
    cfg = load_config("dataset=breast_cancer partitioner=dirichlet partitioner.min_partition_size=0")
    ids, _, _ = partition_layout(cfg.dataset, cfg.partitioner, 100, 5)
    empty = [pid for pid, i in enumerate(ids) if len(i) == 0]
    assert empty, "the draw no longer leaves an empty partition: pick another seed"
    train, val = load_client_data(cfg.dataset, cfg.partitioner, empty[0], 100, 5)
    assert train.x.shape == val.x.shape == (0, 30) and train.x.dtype == np.float32
    assert train.y.shape == (0,) and train.y.dtype == np.int64


def test_client_arrays_are_fresh_copies():
    """Partitions are gathered from the per-process data set on every call: a client that
    scales its arrays in place changes neither the next call's arrays nor the server's."""
    cfg = load_config("")
    train, _ = load_client_data(cfg.dataset, cfg.partitioner, 1, NUM_PARTITIONS, cfg.seed)
    before = train.x.copy()
    train.x.fill(0.0)
    again, _ = load_client_data(cfg.dataset, cfg.partitioner, 1, NUM_PARTITIONS, cfg.seed)
    assert np.array_equal(again.x, before) and again.x.max() > 0


@pytest.mark.integration  # datasets' parquet loader starts worker processes
def test_hub_path_returns_the_images_of_a_row_by_row_reading(tmp_path, monkeypatch):
    """A hub-style data set (PNG images in Parquet, train and test splits) read offline from
    a local folder through Flower Datasets: the bulk numpy slice gives the pixels a per-image
    loop gives, scaled, channels first, in the same order, for the clients and the server."""
    import datasets
    from flwr_datasets import FederatedDataset

    from core.data import _make_partitioner

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split, n in [("train", 120), ("test", 30)]:
        images = [rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"img": images, "label": rng.integers(0, 3, n)}, features)
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    cfg = load_config("dataset=cifar10 partitioner=iid")
    cfg.dataset.hub_name = str(tmp_path / "hub")
    assert data_spec(cfg.dataset).image_shape == (3, 5, 4)

    def rows(ds):
        images = np.stack([np.asarray(img, dtype=np.float32) for img in ds["img"]])
        x = (images.transpose(0, 3, 1, 2) / 255.0).reshape(len(ds), -1).astype(np.float32)
        return x, np.array(list(ds["label"]), dtype=np.int64)

    fds = FederatedDataset(
        dataset=cfg.dataset.hub_name,
        partitioners={"train": _make_partitioner(cfg.partitioner, 4, 0)},
        shuffle=True,
        seed=0,
    )
    test = centralized_test_split(cfg.dataset, 0)
    ref_x, ref_y = rows(fds.load_split("test"))
    assert test.x.shape == (30, 60) and np.array_equal(test.x, ref_x) and np.array_equal(test.y, ref_y)
    for pid in range(4):
        halves = fds.load_partition(pid, "train").train_test_split(test_size=0.1, seed=pid)
        train, val = load_client_data(cfg.dataset, cfg.partitioner, pid, 4, 0)
        for got, ref in ((train, halves["train"]), (val, halves["test"])):
            ref_x, ref_y = rows(ref)
            assert got.x.dtype == np.float32 and got.x.shape == (len(ref), 60)
            assert np.array_equal(got.x, ref_x) and np.array_equal(got.y, ref_y), f"partition {pid}"
