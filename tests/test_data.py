import math

import numpy as np
import pytest

from core.config import load_config
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
        "from core.config import load_config\n"
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
