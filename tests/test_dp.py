"""Client-level and sample-level DP: noise scale, clipping, sensitivity, adaptive clipping,
accounting against an independent dp-accounting computation, and the budget stop."""

import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from flwr.common import Code, Context, FitRes, RecordDict, Status
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from app.config import load_config
from core.data import data_spec, load_client_data
from core.models import build_model, get_weights
from protections.dp.mechanisms import SecureGaussian, clip_update, l2_norm, local_dp_epsilon
from clients.pipeline import build_pipeline
from clients.torch_client import TorchClient
from protections.dp.server import (
    AdaptiveClipping,
    ClientSideFixedClipping,
    ServerSideFixedClipping,
)
from protections.dp.accounting import ClientLevelAccountant, Release
from tests.support.proxies import manager

pytestmark = pytest.mark.unit

SHAPES = [(50, 40), (40,)]
DIM = 50 * 40 + 40


def zeros():
    return [np.zeros(s, dtype=np.float32) for s in SHAPES]


def run_round(wrapper, cm, global_weights, client_updates, server_round=1, examples=None):
    """configure_fit + aggregate_fit with the given client updates (None: a zero update from
    whoever was sampled); returns the new weights."""
    sent = wrapper.configure_fit(server_round, ndarrays_to_parameters(global_weights), cm)
    if client_updates is None:
        client_updates = [zeros()] * len(sent)
    assert len(sent) == len(client_updates)
    results = []
    for i, ((proxy, _), update) in enumerate(zip(sent, client_updates)):
        weights = [g + u for g, u in zip(global_weights, update)]
        n = examples[i] if examples else 10
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), n, {})))
    params, _ = wrapper.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(params)


def fedavg(m):
    return FedAvg(fraction_fit=1.0, min_fit_clients=m, min_available_clients=m)


def dp(cls, m=5, z=1.0, c=1.0, seed=0, **kw):
    return cls(
        fedavg(m), noise_multiplier=z, clipping_norm=c, target_delta=1e-5,
        noise=np.random.default_rng(seed), **kw,
    )  # fmt: skip


# ------------------------------------------------------------------ noise
@pytest.mark.parametrize("z,c,m", [(1.0, 1.0, 5), (0.5, 2.0, 10), (2.0, 0.1, 4)])
def test_noise_std_of_the_aggregate_is_z_c_over_m(z, c, m):
    wrapper = dp(ServerSideFixedClipping, m=m, z=z, c=c, seed=1)
    cm = manager(m)
    draws = np.concatenate(
        [np.concatenate([a.ravel() for a in run_round(wrapper, cm, zeros(), [zeros()] * m, r)])
         for r in range(1, 6)]
    )  # fmt: skip
    assert np.std(draws) == pytest.approx(z * c / m, rel=0.05)
    assert abs(np.mean(draws)) < 3 * z * c / m / math.sqrt(draws.size)


def test_secure_gaussian_has_the_requested_moments():
    draws = SecureGaussian().normal(0.0, 2.5, (100_000,))
    assert draws.shape == (100_000,)
    assert np.std(draws) == pytest.approx(2.5, rel=0.02) and abs(np.mean(draws)) < 0.03


@pytest.mark.parametrize("cls", [ServerSideFixedClipping, ClientSideFixedClipping])
def test_zero_noise_reproduces_the_inner_strategy(cls):
    m = 4
    rng = np.random.default_rng(5)
    updates = [[rng.normal(0, 0.01, s).astype(np.float32) for s in SHAPES] for _ in range(m)]
    global_weights = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    private = run_round(dp(cls, m=m, z=0.0, c=100.0), manager(m), global_weights, updates)
    plain = run_round(fedavg(m), manager(m), global_weights, updates)  # equal example counts
    for a, b in zip(private, plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ clipping
def test_server_clips_an_update_of_norm_10c_to_c():
    big = [np.full(s, 1.0, np.float32) for s in SHAPES]
    big = [a * (10.0 / l2_norm(big)) for a in big]  # norm 10 = 10 C
    out = run_round(dp(ServerSideFixedClipping, m=1, z=0.0, c=1.0), manager(1), zeros(), [big])
    assert l2_norm(out) == pytest.approx(1.0, rel=1e-5)


def test_client_clips_its_update_and_the_server_rejects_an_unclipped_one():
    cfg = load_config(
        "privacy=client_fixed privacy.clipping_norm=0.5 privacy.noise_multiplier=0 "
        "privacy.unprotected_metrics=true"  # to read the update norm
    )
    spec = data_spec(cfg.dataset)
    train_data, val = load_client_data(cfg.dataset, cfg.partitioner, 0, 10, 0)
    model = build_model(cfg.model, spec, seed=0)
    start = get_weights(model)
    client = TorchClient(model, train_data, val, spec.task, cfg.training, "cpu", 0, build_pipeline(cfg))
    weights, _, metrics = client.fit(start, {"server_round": 1, "dp_clipping_norm": 0.5})
    update = [w - s for w, s in zip(weights, start)]
    assert metrics["update_norm"] > 0.5  # training moved it further than C ...
    assert l2_norm(update) == pytest.approx(0.5, rel=1e-4)  # ... and the client clipped

    wrapper = dp(ClientSideFixedClipping, m=2, z=0.0, c=0.5)
    too_big = [u * 3 for u in update]
    out = run_round(wrapper, manager(2), start, [update, too_big])
    # only the clipped update counts, divided by the 2 sampled clients
    for o, s, u in zip(out, start, update):
        np.testing.assert_allclose(o, s + u / 2, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    array=arrays(np.float64, array_shapes(max_dims=3, max_side=8),
                 elements=st.floats(-1e3, 1e3, allow_nan=False)),
    c=st.floats(1e-3, 1e3),
)  # fmt: skip
def test_clip_bounds_the_norm_and_keeps_direction(array, c):
    (clipped,), was_clipped = clip_update([array], c)
    norm = l2_norm([array])
    assert l2_norm([clipped]) <= c * (1 + 1e-9)
    if norm <= c:
        np.testing.assert_array_equal(clipped, array)  # under C, zero included: untouched
        assert not was_clipped
    else:
        assert was_clipped
        np.testing.assert_allclose(clipped * norm / c, array, rtol=1e-9, atol=1e-9)


def test_zero_update_is_clipped_without_dividing_by_zero():
    with np.errstate(all="raise"):
        out, was_clipped = clip_update(zeros(), 1.0)
    assert not was_clipped and l2_norm(out) == 0.0


# ------------------------------------------------------------------ sensitivity
@settings(max_examples=20, deadline=None)
@given(claimed=st.integers(1, 10**9), scale=st.floats(1e-3, 1e6))
def test_one_client_moves_the_aggregate_by_at_most_c_over_m(claimed, scale):
    m, c = 5, 1.0
    rng = np.random.default_rng(0)
    others = [[rng.normal(0, 0.1, s).astype(np.float32) for s in SHAPES] for _ in range(m - 1)]
    with_zero = run_round(dp(ServerSideFixedClipping, m=m, z=0.0, c=c), manager(m), zeros(),
                          others + [zeros()])  # fmt: skip
    outlier = [np.full(s, scale, np.float32) for s in SHAPES]
    with_outlier = run_round(dp(ServerSideFixedClipping, m=m, z=0.0, c=c), manager(m), zeros(),
                             others + [outlier], examples=[10] * (m - 1) + [claimed])  # fmt: skip
    moved = l2_norm([a - b for a, b in zip(with_outlier, with_zero)])
    assert moved <= c / m * (1 + 1e-5)


# ------------------------------------------------------------------ adaptive clipping
def test_adaptive_clipping_norm_converges_to_the_target_quantile():
    m = 20
    wrapper = dp(AdaptiveClipping, m=m, z=0.0, c=0.1, target_quantile=0.5, clip_norm_lr=0.2)
    cm = manager(m)
    rng = np.random.default_rng(3)
    direction = [np.ones(s, np.float32) for s in SHAPES]
    direction = [d / l2_norm(direction) for d in direction]
    for r in range(1, 61):
        norms = rng.uniform(0.0, 10.0, m)  # median 5
        run_round(wrapper, cm, zeros(), [[d * n for d in direction] for n in norms], r)
    assert wrapper.clipping_norm == pytest.approx(5.0, rel=0.2)


def test_adaptive_noise_split_keeps_the_configured_total():
    wrapper = dp(AdaptiveClipping, m=20, z=0.5, c=1.0, clipped_count_stddev=1.0)
    run_round(wrapper, manager(20), zeros(), [zeros()] * 20)
    z_update, count_std = wrapper.update_noise_multiplier, wrapper.clipped_count_stddev
    assert (z_update**-2 + (2 * count_std) ** -2) ** -0.5 == pytest.approx(0.5)
    assert [r.noise_multiplier for r in wrapper.releases()] == [pytest.approx(0.5)]


# ------------------------------------------------------------------ accounting
def independent_epsilon(q, z, rounds, delta, extra_z=None):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    if extra_z is not None:
        count = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(extra_z))
        accountant.compose(count, rounds)
    return accountant.get_epsilon(delta)


def test_reported_epsilon_matches_dp_accounting_every_round():
    n, m, z = 10, 5, 1.0
    wrapper = dp(ServerSideFixedClipping, m=m, z=z)
    cm = manager(n)
    wrapper.strategy = FedAvg(fraction_fit=0.5, min_fit_clients=2, min_available_clients=2)
    for r in range(1, 4):
        run_round(wrapper, cm, zeros(), None, r)  # a Poisson cohort: its size varies
        report = wrapper.round_report(r)["privacy"]
        assert report["epsilon"] == pytest.approx(independent_epsilon(m / n, z, r, 1e-5), rel=1e-6)
        assert report["epsilon_pld"] == pytest.approx(independent_pld(m / n, z, r), rel=1e-3)
        assert report["epsilon_pld"] <= report["epsilon"]
        assert report["delta"] == 1e-5 and report["sampling_rate"] == 0.5


def independent_pld(q, z, rounds, delta=1e-5, relation="ADD_OR_REMOVE_ONE"):
    from dp_accounting import pld
    from dp_accounting.privacy_accountant import NeighboringRelation

    accountant = pld.PLDAccountant(getattr(NeighboringRelation, relation))
    event = dp_accounting.GaussianDpEvent(z)
    accountant.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event), rounds)
    return accountant.get_epsilon(delta)


def test_adaptive_accounts_its_two_releases_as_one_sampled_event():
    """Audit defect 3: the noised update and the noised count share the cohort. N=100, m=20,
    z=1, one round: composing them as two independently sampled events reported 2.27; the
    PLD of the real mechanism (one sampled Gaussian at the joint z) is 2.45."""
    n, m = 100, 20
    wrapper = dp(AdaptiveClipping, m=m, z=1.0)
    wrapper.strategy = FedAvg(fraction_fit=0.2, min_fit_clients=2, min_available_clients=2)
    run_round(wrapper, manager(n), zeros(), None, 1)
    report = wrapper.round_report(1)["privacy"]
    assert report["epsilon"] == pytest.approx(independent_epsilon(0.2, 1.0, 1, 1e-5), rel=1e-6)
    exact = independent_pld(0.2, 1.0, 1)
    assert exact == pytest.approx(2.45, abs=0.02)
    assert report["epsilon"] >= exact and report["epsilon_pld"] == pytest.approx(exact, rel=1e-3)
    [joint] = wrapper.releases()
    z_u, count_std = wrapper.update_noise_multiplier, wrapper.clipped_count_stddev
    assert joint.noise_multiplier == pytest.approx((z_u**-2 + (2 * count_std) ** -2) ** -0.5)
    assert joint.noise_multiplier == pytest.approx(1.0)


def test_without_replacement_accounts_the_replace_one_sensitivity_2c():
    """Audit defect 2: N = m = 10, z = 2, one round. Replace-one moves the sum by 2C: the
    exact epsilon (PLD, REPLACE_ONE) is 4.377; the project reported 2.166."""
    n = m = 10
    wrapper = dp(ServerSideFixedClipping, m=m, z=2.0, sampling="without_replacement")
    run_round(wrapper, manager(n), zeros(), [zeros()] * m, 1)
    report = wrapper.round_report(1)["privacy"]
    exact = independent_pld(1.0, 2.0, 1, relation="REPLACE_ONE")
    assert exact == pytest.approx(4.377, abs=0.01)
    rdp = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    rdp.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(1.0)))
    assert report["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-6)
    assert report["epsilon"] >= exact > 2.2
    assert report["neighbouring"] == "replace one client's data"


def test_budget_stops_before_the_round_that_would_exceed_it():
    n, m, z, budget = 10, 5, 1.0, 3.0
    first_over = next(r for r in range(1, 500) if independent_epsilon(m / n, z, r, 1e-5) > budget)
    wrapper = dp(ServerSideFixedClipping, m=m, z=z, epsilon_budget=budget)
    wrapper.strategy = FedAvg(fraction_fit=0.5, min_fit_clients=2, min_available_clients=2)
    cm = manager(n)
    r = 1
    while wrapper.configure_fit(r, ndarrays_to_parameters(zeros()), cm):
        run_round(wrapper, cm, zeros(), [zeros()] * m, r)
        r += 1
    assert r == first_over  # rounds 1..first_over-1 ran, first_over was refused
    assert wrapper.accountant.epsilon <= budget
    assert "privacy budget" in wrapper.stop_reason() and f"round {first_over}" in wrapper.stop_reason()


def test_without_replacement_accounting_is_available_and_more_conservative():
    poisson = ClientLevelAccountant(100, 10, 1e-5, "poisson")
    fixed = ClientLevelAccountant(100, 10, 1e-5, "without_replacement")
    for acc in (poisson, fixed):
        acc.spend([Release(1.0)] * 4)  # (PLD accounting costs about 0.4 s a release)
    assert fixed.epsilon > 1.5 * poisson.epsilon > 0


# ------------------------------------------------------------------ local and sample-level DP
def make_client(overrides, context):
    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    train_data, val = load_client_data(cfg.dataset, cfg.partitioner, 0, 10, 0)
    model = build_model(cfg.model, spec, seed=0)
    steps = build_pipeline(replace(cfg, num_rounds=3))  # a client of a 3-round run
    client = TorchClient(model, train_data, val, spec.task, cfg.training, "cpu", 0, steps, context)
    return client, get_weights(model), cfg, len(train_data)


def new_context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_local_dp_epsilon_accumulates_per_release():
    context = new_context()
    client, start, cfg, _ = make_client(
        "privacy=local privacy.noise_seed=1 privacy.allow_reproducible_noise=true", context
    )
    config = {"server_round": 1, "dp_clipping_norm": 1.0, "dp_local_noise_multiplier": 1.0}
    epsilons = []
    for r in (1, 2, 3):
        config["server_round"] = r
        _, _, metrics = client.fit(start, config)
        epsilons.append(metrics["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert epsilons[2] == pytest.approx(local_dp_epsilon(1.0, 3, 1e-5))
    expected = dp_accounting.rdp.RdpAccountant()  # replace-one: sensitivity 2C, so z/2
    expected.compose(dp_accounting.GaussianDpEvent(0.5), 3)
    assert epsilons[2] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-6)


def test_local_dp_accounts_any_two_inputs_of_a_client():
    """Audit defect 4: one release at z=1 protects two arbitrary inputs (sensitivity 2C): the
    exact epsilon is 10.0 (PLD, REPLACE_ONE); the project reported 4.73."""
    exact = independent_pld(1.0, 1.0, 1, relation="REPLACE_ONE")
    assert exact == pytest.approx(10.0, abs=0.01)
    assert local_dp_epsilon(1.0, 1, 1e-5) >= exact > 4.8


def test_dpsgd_epsilon_grows_across_rounds_and_matches_opacus():
    from opacus.accountants import RDPAccountant

    context = new_context()
    overrides = (
        "privacy=dpsgd privacy.noise_multiplier=1.1 training.local_epochs=1 "
        "privacy.unprotected_metrics=true"  # to read the step count
    )
    client, start, cfg, n = make_client(overrides, context)
    steps_total, epsilons = 0, []
    weights = start
    for r in (1, 2, 3):
        # the ClientApp rebuilds the client each round; the Context carries the accountant
        client, _, _, _ = make_client(overrides, context)
        weights, _, metrics = client.fit(weights, {"server_round": r})
        steps_total += metrics["steps"]
        epsilons.append(metrics["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]
    reference = RDPAccountant()
    q = cfg.privacy.sample_rate  # public, not 1 / ceil(n / batch_size)
    reference.history = [(1.1, q, steps_total)]
    assert epsilons[2] == pytest.approx(reference.get_epsilon(1e-5), rel=0.02)


def test_dpsgd_target_epsilon_sets_the_noise():
    from protections.dp.dpsgd import noise_multiplier_for

    cfg = load_config("privacy=dpsgd privacy.target_epsilon=3.0")
    z = noise_multiplier_for(cfg.privacy, sample_rate=0.1, local_epochs=2, max_rounds=5)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, 0.1, 10 * 2 * 5)]  # int(1/q) steps per epoch
    assert acc.get_epsilon(1e-5) == pytest.approx(3.0, rel=0.05)


def test_delta_not_below_one_over_n_fails_before_the_first_round():
    wrapper = ClientSideFixedClipping(
        fedavg(2), noise_multiplier=1.0, clipping_norm=1.0, target_delta=0.6,
        noise=np.random.default_rng(0),
    )  # fmt: skip
    with pytest.raises(ValueError, match="1/N = 1/2"):
        wrapper.configure_fit(1, ndarrays_to_parameters(zeros()), manager(2))


def test_dpsgd_target_epsilon_holds_for_a_client_sampled_every_round():
    context = new_context()
    overrides = "privacy=dpsgd privacy.target_epsilon=2.0 training.local_epochs=1"
    weights = None
    for r in (1, 2, 3):
        client, start, _, _ = make_client(overrides, context)  # max_rounds=3
        weights, _, metrics = client.fit(weights or start, {"server_round": r})
    assert metrics["epsilon"] <= 2.0 * 1.01
    assert metrics["epsilon"] == pytest.approx(2.0, rel=0.05)  # and not far below it


# ------------------------------------------------------------------ audit defects 1, 5, 6, 7
def test_dpsgd_noise_and_batches_cannot_be_replayed_from_the_public_seed():
    """Defect 1: the same client, data, round and seed twice gives different models: the
    batch masks and noise come from OS entropy, not from the config-derived seed."""
    context = new_context()
    client, start, _, _ = make_client("privacy=dpsgd training.local_epochs=1", context)
    first, _, _ = client.fit(start, {"server_round": 1})
    client, _, _, _ = make_client("privacy=dpsgd training.local_epochs=1", new_context())
    second, _, _ = client.fit(start, {"server_round": 1})
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, second)) > 1e-3


def test_dpsgd_client_sends_only_its_epsilon_and_weight_one():
    """Defect 5: the example count (the FedAvg weight), train loss/accuracy and step counts
    stay on the client; the opt-in sends them."""
    client, start, _, n = make_client("privacy=dpsgd training.local_epochs=1", new_context())
    _, num_examples, metrics = client.fit(start, {"server_round": 1})
    assert num_examples == 1 and n > 1 and set(metrics) == {"epsilon"}
    with pytest.raises(PermissionError, match="no accountant covers"):
        client.evaluate(start, {"server_round": 1})
    client, start, _, n = make_client(
        "privacy=dpsgd training.local_epochs=1 privacy.unprotected_metrics=true", new_context()
    )
    _, num_examples, metrics = client.fit(start, {"server_round": 1})
    assert num_examples == n and {"epsilon", "train_loss", "steps"} <= set(metrics)


def test_client_level_dp_client_sends_no_metrics():
    client, start, _, _ = make_client("privacy=client_fixed", new_context())
    _, num_examples, metrics = client.fit(start, {"server_round": 1, "dp_clipping_norm": 1.0})
    assert num_examples == 1 and metrics == {}


def test_privacy_turns_off_federated_evaluation_unless_opted_in():
    from strategies.factory import build_strategy

    def evaluated_fraction(overrides):
        stack = build_strategy(load_config(overrides), ndarrays_to_parameters(zeros()), None)
        inner = stack
        while hasattr(inner, "strategy"):
            inner = inner.strategy
        return inner.fraction_evaluate

    assert evaluated_fraction("") == 0.5
    assert evaluated_fraction("privacy=server_fixed") == 0.0
    assert evaluated_fraction("privacy=local") == 0.0
    assert evaluated_fraction("privacy=server_fixed privacy.unprotected_metrics=true") == 0.5


def test_report_names_what_is_not_covered_and_hides_the_clipped_count():
    wrapper = dp(ServerSideFixedClipping, m=4, z=1.0)
    big = [np.full(s, 1.0, np.float32) for s in SHAPES]
    run_round(wrapper, manager(4), zeros(), [big] * 4)
    report = wrapper.round_report(1)["privacy"]
    assert "clients_clipped" not in report
    assert any("clients_aggregated" in item for item in report["not_covered"])
    opted = dp(ServerSideFixedClipping, m=4, z=1.0, unprotected_metrics=True)
    run_round(opted, manager(4), zeros(), [big] * 4)
    report = opted.round_report(1)["privacy"]
    assert report["clients_clipped"] == 4
    assert any("clients_clipped" in item and "opted in" in item for item in report["not_covered"])
    assert any("federated evaluation" in item and "opted in" in item for item in report["not_covered"])
    assert not any("federated evaluation" in item for item in wrapper.round_report(1)["privacy"]["not_covered"])


def test_poisson_sampling_draws_each_client_independently():
    """Defect 6: the mechanism the default analysis describes. N=40, q=0.25: the cohort size
    is Binomial(40, 0.25) (mean 10, variance 7.5) and every client joins about q of the time."""
    n = 40
    wrapper = dp(ServerSideFixedClipping, m=10, z=1.0)
    wrapper.strategy = FedAvg(fraction_fit=0.25, min_fit_clients=1, min_available_clients=n)
    cm = manager(n)
    sizes, joined = [], np.zeros(n)
    for r in range(1, 401):
        sent = wrapper.configure_fit(r, ndarrays_to_parameters(zeros()), cm)
        sizes.append(len(sent))
        for proxy, _ in sent:
            joined[int(proxy.cid)] += 1
    assert np.mean(sizes) == pytest.approx(10, abs=0.6)
    assert np.var(sizes) == pytest.approx(7.5, rel=0.3)
    assert 60 < joined.min() and joined.max() < 140  # each client ~ Binomial(400, 0.25) = 100
    assert wrapper.accountant.sampling_rate == 0.25


def test_fixed_size_sampling_draws_exactly_m():
    wrapper = dp(ServerSideFixedClipping, m=10, z=1.0, sampling="without_replacement")
    wrapper.strategy = FedAvg(fraction_fit=0.25, min_fit_clients=1, min_available_clients=40)
    sizes = {len(wrapper.configure_fit(r, ndarrays_to_parameters(zeros()), manager(40)))
             for r in range(1, 30)}  # fmt: skip
    assert sizes == {10}


def test_an_empty_poisson_cohort_releases_noise_alone_and_is_accounted():
    """An empty cohort is a round of the analysed mechanism: the model moves by N(0, (zC/m)^2)
    with m = q*N, and the round costs budget like any other."""
    from protections.dp.sampling import PrivateCohort

    n, z, c = 20, 1.0, 1.0
    wrapper = dp(ServerSideFixedClipping, m=5, z=z, c=c, seed=4)
    wrapper.strategy = FedAvg(fraction_fit=0.25, min_fit_clients=1, min_available_clients=n)

    class Nobody(PrivateCohort):
        def sample(self, num_clients, min_num_clients=None, criterion=None):
            return []

    import protections.dp.server as module

    original = module.PrivateCohort
    module.PrivateCohort = Nobody
    try:
        assert wrapper.configure_fit(1, ndarrays_to_parameters(zeros()), manager(n)) == []
    finally:
        module.PrivateCohort = original
    assert wrapper.empty_round(1)
    params, _ = wrapper.aggregate_fit(1, [], [])
    released = np.concatenate([a.ravel() for a in parameters_to_ndarrays(params)])
    assert np.std(released) == pytest.approx(z * c / 5, rel=0.05)
    assert wrapper.round_report(1)["privacy"]["epsilon"] == pytest.approx(
        independent_epsilon(0.25, z, 1, 1e-5), rel=1e-6
    )


def test_an_empty_cohort_round_runs_through_the_server_loop():
    from app.experiment_server import ExperimentServer

    class Recorder:
        rounds = []

        def add_round(self, record):
            self.rounds.append(record)

        def set_initial(self, metrics):
            pass

    from strategies.factory import build_strategy

    cfg = load_config("privacy=server_fixed strategy.fraction_train=0.5 strategy.min_train_clients=1")
    stack = build_strategy(cfg, ndarrays_to_parameters(zeros()), None)
    dp_layer = stack
    while not isinstance(dp_layer, ServerSideFixedClipping):
        dp_layer = dp_layer.strategy
    dp_layer._empty_rounds.add(1)  # as configure_fit records for an empty draw
    dp_layer._global[1] = zeros()
    dp_layer._sampled[1] = 5
    server = ExperimentServer(client_manager=manager(10), strategy=stack, recorder=Recorder())
    server.strategy.configure_fit = lambda server_round, parameters, client_manager: []
    parameters, _, (results, failures) = server.fit_round(1, None)
    assert results == [] and failures == []
    assert l2_norm(parameters_to_ndarrays(parameters)) > 0  # the noise was released


def test_default_noise_source_is_the_os_csprng():
    from strategies.factory import build_strategy

    stack = build_strategy(load_config("privacy=server_fixed"), ndarrays_to_parameters(zeros()), None)
    while not isinstance(stack, ServerSideFixedClipping):
        stack = stack.strategy
    assert isinstance(stack.noise, SecureGaussian)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ("privacy=server_fixed privacy.noise_multiplier=0 privacy.epsilon_budget=3",
         "noise_multiplier=0 releases updates without noise (epsilon = inf)"),
        ("privacy=server_fixed privacy.noise_seed=3",
         "makes every noise draw reproducible by whoever reads the config"),
        ("privacy=local privacy.noise_seed=3", "privacy.allow_reproducible_noise=true"),
        ("privacy=client_fixed secagg=he privacy.accounting=poisson",
         "secagg=he samples a fixed-size cohort"),
    ],
)  # fmt: skip
def test_config_refuses_what_voids_the_guarantee(overrides, expected):
    from core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert expected in str(err.value)


def test_reproducible_noise_can_be_forced_for_tests_and_accounting_auto_resolves():
    cfg = load_config("privacy=server_fixed privacy.noise_seed=3 privacy.allow_reproducible_noise=true")
    assert cfg.privacy.noise_seed == 3 and cfg.privacy.accounting == "poisson"
    assert load_config("privacy=client_fixed secagg=he").privacy.accounting == "without_replacement"


def test_an_update_the_server_rejects_is_recorded_with_its_node():
    wrapper = dp(ClientSideFixedClipping, m=2, z=0.0, c=0.5)
    big = [np.full(s, 1.0, np.float32) for s in SHAPES]
    run_round(wrapper, manager(2), zeros(), [zeros(), big])
    [(node, reason)] = wrapper.rejected_updates(1)
    assert node in {"0", "1"} and "exceeds clipping_norm 0.5" in reason


@pytest.mark.parametrize("n", [100, 60])
def test_dpsgd_model_does_not_reveal_the_data_set_size(n):
    """Review finding: Opacus divided the noised sum by n*q and took ceil(n/B) steps, so the
    noise scale of the released model told n. Now q, the steps and the divisor are public:
    on zero-gradient data the weights' spread is z*C*lr*sqrt(steps)/B whatever n is."""
    from torch import nn

    from core.data import ArraySplit
    from protections.dp.dpsgd import train_dpsgd

    cfg = load_config("privacy=dpsgd training.local_epochs=1 training.lr=1.0 training.momentum=0")
    model = nn.Linear(2000, 2, bias=False)
    nn.init.zeros_(model.weight)
    data = ArraySplit(np.zeros((n, 2000), np.float32), np.zeros(n, np.int64))
    train_dpsgd(model, data, cfg.training, cfg.privacy, "classification", "cpu", 0, "[]", 1)
    steps = int(1 / cfg.privacy.sample_rate)
    expected = cfg.privacy.noise_multiplier * cfg.privacy.max_grad_norm * math.sqrt(steps) / 16
    assert float(model.weight.detach().std()) == pytest.approx(expected, rel=0.05)


def test_a_population_change_keeps_poisson_q_and_stops_fixed_size_sampling():
    """Review finding: q and the divisor followed the live population while the accountant
    kept round 1's: 90 of 100 clients leaving made the real q 10x the accounted one."""
    wrapper = dp(ServerSideFixedClipping, m=2, z=1.0)
    wrapper.strategy = FedAvg(fraction_fit=0.02, min_fit_clients=2, min_available_clients=2)
    run_round(wrapper, manager(100), zeros(), None, 1)
    sizes = [len(wrapper.configure_fit(r, ndarrays_to_parameters(zeros()), manager(10)))
             for r in range(2, 402)]  # fmt: skip
    assert np.mean(sizes) == pytest.approx(10 * 0.02, abs=0.08)  # q stays 2/100
    assert wrapper._sampled[401] == 2 and wrapper.accountant.sampling_rate == 0.02

    fixed = dp(ServerSideFixedClipping, m=2, z=1.0, sampling="without_replacement")
    fixed.strategy = FedAvg(fraction_fit=0.02, min_fit_clients=2, min_available_clients=2)
    run_round(fixed, manager(100), zeros(), None, 1)
    assert fixed.configure_fit(2, ndarrays_to_parameters(zeros()), manager(10)) == []
    assert "10 clients connected but the accountant samples 2 of 100" in fixed.stop_reason()


def test_the_cohort_cannot_be_replayed_by_seeding_the_global_generators():
    """README: nobody can predict or replay who was sampled. Flower's own sampling uses
    Python's global `random`; seeding it (and NumPy's) must not reproduce our cohorts."""
    import random

    from protections.dp.sampling import PrivateCohort

    draws = []
    for _ in range(2):
        random.seed(0)
        np.random.seed(0)
        cohort = PrivateCohort(manager(200), poisson_rate=0.5)
        draws.append(sorted(int(p.cid) for p in cohort.sample(100, 1)))
    assert draws[0] != draws[1]
