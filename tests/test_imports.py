"""A client imports only what its configuration uses.

A deployed SuperNode starts a fresh ClientApp process for every message, so each module its
first `client_fn` call imports is paid per message (`python -m benchmarks.client_import`
prints the seconds). These tests run the probe of tests/support/client_import.py in a fresh
`python -c` per configuration and check which heavy packages are loaded, and that the client
still trains; the unit test checks the data-set-free spec and pool size that make a
`data-path` site need neither scikit-learn nor `datasets`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import load_config
from core.data import _key, _load_local_arrays, _local_cached, client_pool_size, data_spec
from tests.support.client_import import HEAVY, SCENARIOS, run_probe

ROOT = Path(__file__).resolve().parents[1]
SITE_ROWS, SITE_TRAIN = 60, 54  # the probe's site file; val_fraction 0.1 keeps ceil(6) back
# hydra composes the config on every party; everything else is per configuration.
NOT_FOR_A_SITE = set(HEAVY) - {"hydra"}
SCENARIO = {s.name: s for s in SCENARIOS}


@pytest.mark.parametrize(
    "overrides",
    [
        "",
        "dataset.test_fraction=0.013 dataset.public_fraction=0.37",
        "dataset=breast_cancer dataset.test_fraction=0.333",
        "dataset=breast_cancer dataset.public_fraction=0.5",
        "dataset=linear dataset.n_samples=257 dataset.test_fraction=0.77",
        "dataset=linear dataset.n_samples=1001 dataset.public_fraction=0.2",
    ],
)
def test_spec_and_pool_size_without_the_data_set_match_the_loaded_data_set(overrides):
    """data_spec and client_pool_size no longer load the data set: they must give what the
    loaded data set and its seeded splits give."""
    d = load_config(overrides).dataset
    _, y, loaded_spec = _load_local_arrays(d, 0)
    assert data_spec(d) == loaded_spec
    for seed in (0, 5):
        assert client_pool_size(d, seed) == len(_local_cached(_key(d), seed).pool_ids)


@pytest.mark.integration
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_a_first_client_fn_imports_only_what_the_configuration_uses(name, tmp_path):
    scenario = SCENARIO[name]
    r = run_probe(ROOT, scenario, tmp_path, fit=True)
    # Importing the ClientApp loads none of them but Hydra, whatever the configuration.
    assert r["after_import"] == ["hydra"]
    loaded = set(r["after_client_fn"])
    if scenario.file_suffix is None:  # simulation-style: Flower Datasets partitions the pool
        assert {"datasets", "flwr_datasets", "sklearn"} <= loaded
        assert not loaded & {"tenseal", "opacus", "ray"}
    elif "secagg=he" in scenario.overrides:
        assert loaded & NOT_FOR_A_SITE == {"tenseal"}
    else:  # a site with its own file, no HE: none of them, even after training
        assert not loaded & NOT_FOR_A_SITE
        if "dpsgd" in scenario.overrides:
            assert "opacus" in r["after_fit"]  # loaded by the DP-SGD training it runs
        else:
            assert not set(r["after_fit"]) & NOT_FOR_A_SITE
    # The client still trains: the model it returns has the shapes it was sent, changed.
    assert r["fit_shapes"] == r["sent_shapes"] and r["fit_changed"]
    if scenario.file_suffix is None:  # partition 0 of 4 of digits' 1437-row pool, iid
        part = -(-1437 // 4)
        assert r["fit_examples"] == part - -(-part // 10)  # less its ceil(10%) validation
    elif "privacy=" in scenario.overrides:
        assert r["fit_examples"] == 1  # ReleaseOnlyAccounted reports weight 1
    else:
        assert r["fit_examples"] == SITE_TRAIN
