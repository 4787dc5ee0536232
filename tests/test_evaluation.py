"""The metrics a clinical reader asks for (core/evaluation.py), against scikit-learn and an
independent ECE, over random predictions (hypothesis), and through a real model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, r2_score, recall_score

from core.data_types import ArraySplit
from core.evaluation import classification_metrics, evaluate, regression_metrics


def reference_ece(y, probs, bins):
    """ECE written the other way round: bin edges and np.digitize (right-closed bins)."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(y) * abs(np.mean(predicted[m] == y[m]) - confidence[m].mean())
    return total


@st.composite
def predictions(draw):
    k = draw(st.integers(2, 5))
    n = draw(st.integers(2, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, draw(st.floats(0.1, 4.0)), (n, k))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    return y, probs, draw(st.floats(0.05, 0.95)), draw(st.integers(1, 20))


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_classification_metrics_equal_sklearns_and_an_independent_ece(case):
    y, probs, threshold, bins = case
    m = classification_metrics(y, probs, threshold, bins)
    if probs.shape[1] == 2:
        decided = (probs[:, 1] >= threshold).astype(int)
        assert m["f1"] == pytest.approx(f1_score(y, decided, zero_division=0), abs=1e-12)
        if 1 in y:
            assert m["sensitivity"] == pytest.approx(recall_score(y, decided, pos_label=1), abs=1e-12)
        if 0 in y:
            assert m["specificity"] == pytest.approx(recall_score(y, decided, pos_label=0), abs=1e-12)
        for k in np.unique(y):
            assert m[f"recall_{k}"] == pytest.approx(recall_score(y, decided, labels=[k], average=None)[0])
    else:
        predicted = probs.argmax(axis=1)
        assert m["f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0), abs=1e-12)
        for k in np.unique(y):
            assert m[f"recall_{k}"] == pytest.approx(recall_score(y, predicted, labels=[k], average=None)[0])
        assert "sensitivity" not in m and "auroc" not in m
    assert sorted(k for k in m if k.startswith("recall_")) == sorted(f"recall_{k}" for k in np.unique(y))
    assert m["ece"] == pytest.approx(reference_ece(y, probs, bins), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == y))


def test_a_perfectly_calibrated_predictor_has_an_ece_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 200_000)  # confidence p in the predicted class 1, right w.p. p
    y = (rng.uniform(size=p.size) < p).astype(int)
    calibrated = np.stack([1 - p, p], axis=1)
    assert classification_metrics(y, calibrated)["ece"] < 0.01
    overconfident = np.stack([np.full_like(p, 0.01), np.full_like(p, 0.99)], axis=1)
    assert classification_metrics(y, overconfident)["ece"] == pytest.approx(0.99 - y.mean(), abs=1e-9)


def test_the_threshold_moves_sensitivity_against_specificity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 500), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    low, high = classification_metrics(y, probs, 0.2), classification_metrics(y, probs, 0.8)
    assert low["sensitivity"] > high["sensitivity"] and low["specificity"] < high["specificity"]
    assert low["accuracy"] == high["accuracy"]  # accuracy stays the argmax one


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(0, 2**32 - 1))
def test_regression_metrics_equal_sklearns(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, 1))
    pred = y + rng.normal(0, 0.5, (n, 1))
    m = regression_metrics(y, pred)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)), rel=1e-12)
    assert m["r2"] == pytest.approx(r2_score(y, pred), rel=1e-9, abs=1e-12)
    assert "r2" not in regression_metrics(np.ones((n, 1)), pred)  # no variance: undefined


def test_a_model_evaluates_to_the_metrics_of_its_own_outputs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(257, 4)).astype(np.float32)
    y = rng.integers(0, 3, 257)
    model = torch.nn.Linear(4, 3)
    got = evaluate(model, ArraySplit(x, y), "classification", torch.device("cpu"), batch_size=50,
                   threshold=0.5, calibration_bins=10)  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    want = classification_metrics(y, probs, 0.5, 10)
    assert got.keys() - {"loss"} == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6)
    reg = torch.nn.Linear(4, 1)
    yr = rng.normal(size=(257, 1)).astype(np.float32)
    out = evaluate(reg, ArraySplit(x, yr), "regression", torch.device("cpu"))
    with torch.no_grad():
        pred = reg(torch.from_numpy(x)).numpy()
    assert out["loss"] == pytest.approx(float(np.mean((pred - yr) ** 2)), rel=1e-5)
    assert out["rmse"] == pytest.approx(np.sqrt(out["loss"]), rel=1e-5)


def test_each_site_reports_its_own_metrics_without_privacy_and_none_under_dp(tmp_path):
    """evaluation.per_site (default: on without privacy, off under it): the round's
    `federated_sites` holds every evaluating client's own metrics by partition, the
    `federated` mean is their example-weighted mean, and the report shows them."""
    from app.report import run_report
    from tests.support.rounds import in_process_run

    overrides = ("dataset=breast_cancer model=linear num_rounds=1 strategy.fraction_evaluate=1.0 "
                 "strategy.min_evaluate_clients=3 evaluation.threshold=0.4")  # fmt: skip
    run = in_process_run(overrides, tmp_path / "plain", num_nodes=3, seed=0).fit()
    record = run.recorder.record.rounds[-1]
    sites = record.federated_sites
    assert sorted(sites) == ["partition-0", "partition-1", "partition-2"]
    for metrics in sites.values():
        assert {"loss", "num_examples", "accuracy", "auroc", "sensitivity", "specificity", "f1", "ece"} <= set(metrics)
    total = sum(m["num_examples"] for m in sites.values())
    for key in ("accuracy", "sensitivity", "ece"):
        mean = sum(m[key] * m["num_examples"] for m in sites.values()) / total
        assert record.federated[key] == pytest.approx(mean, rel=1e-9)
    page = run_report(tmp_path / "plain")
    assert "Per site (round 1)" in page and "partition-2" in page and "not covered by differential" in page

    # under DP, with federated evaluation turned on (privacy.unprotected_metrics): the mean, no sites
    dp = f"{overrides} privacy=server_fixed privacy.noise_multiplier=0.5 privacy.unprotected_metrics=true"
    rounds = in_process_run(dp, tmp_path / "dp", num_nodes=3).fit().recorder.record.rounds
    assert rounds[-1].federated is not None and rounds[-1].federated_sites is None
    rounds = in_process_run(f"{dp} evaluation.per_site=true", tmp_path / "dp2", num_nodes=3).fit().recorder.record.rounds
    # (no seeded sampling under DP, so no partition ids asked: the sites are named by node)
    assert sorted(rounds[-1].federated_sites) == ["node-100", "node-101", "node-102"]


def test_the_console_line_names_the_headline_metrics_and_leaves_the_rest_to_results_json():
    from app.experiment_server import _round_line
    from core.results import RoundRecord

    metrics = classification_metrics(np.array([0, 1, 2, 1]), np.eye(3)[[0, 1, 1, 1]] * 0.9 + 0.1 / 3)
    line = _round_line(RoundRecord(round=2, centralized={"loss": 0.5, **metrics}, seconds=1.0), 5, 3.0)
    assert line.startswith("round 2/5 | central loss 0.5000 accuracy 0.7500 f1 ")
    assert "recall_" not in line and "ece" not in line
