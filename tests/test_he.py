"""HE secure aggregation: the decrypted aggregate equals the plaintext weighted mean, the server
holds no secret key, bad updates are rejected while the round goes on, DP noise on the
encrypted sum has the calibrated scale, and bad settings fail before training."""

import logging
import math

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import load_config
from core.config import ConfigError
from protections.he.config import he_params
from protections.he.context import (
    HEError,
    HEParams,
    load_context,
    new_context,
    pack_payload,
    provision,
    unpack_payload,
)
from core.models import get_weights
from protections.he.client import decrypt_model, encrypt_update
from protections.dp.server import ClientSideFixedClipping, EncryptedClientSideClipping
from protections.he.server import HomomorphicAggregation
from tests.support.he import he_client
from tests.support.proxies import manager

pytestmark = pytest.mark.unit

PARAMS = HEParams()


@pytest.fixture(scope="module")
def keys():
    """One secret context (the clients') and its public counterpart (the server's)."""
    secret = new_context(PARAMS)
    return secret, secret.public()


def he_fedavg(public, m, **kwargs):
    base = FedAvg(fraction_fit=1.0, min_fit_clients=m, min_available_clients=m)
    return HomomorphicAggregation(base, public, **kwargs)


def fit_res(payload, num_examples):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), num_examples, {})


def run_he_round(strategy, secret, global_arrays, models, weights, server_round=1):
    """configure_fit, clients encrypt their models, aggregate_fit; returns (params, proxies)."""
    sent = strategy.configure_fit(
        server_round, ndarrays_to_parameters(global_arrays), manager(len(models))
    )
    assert len(sent) == len(models)
    results = [
        (proxy, fit_res(encrypt_update(secret, model, w, server_round), w))
        for (proxy, _), model, w in zip(sent, models, weights)
    ]
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return params, [proxy for proxy, _ in sent]


def decrypt(secret, params, shapes, **kwargs):
    return decrypt_model(secret, parameters_to_ndarrays(params), shapes, **kwargs)


# ------------------------------------------------------------------ correctness
shapes_strategy = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 5000)),
        st.tuples(st.integers(1, 70), st.integers(1, 70)),
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 9)),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=shapes_strategy,
    num_clients=st.integers(1, 20),
    seed=st.integers(0, 2**31),
    spread=st.sampled_from([0.01, 0.1, 1.0, 4.0]),
)
def test_decrypted_aggregate_equals_plaintext_weighted_mean(keys, shapes, num_clients, seed, spread):
    secret, public = keys
    rng = np.random.default_rng(seed)
    models = [
        [np.clip(rng.normal(0, spread, s), -8, 8).astype(np.float32) for s in shapes]
        for _ in range(num_clients)
    ]
    weights = [int(w) for w in rng.integers(1, 500, num_clients)]
    strategy = he_fedavg(public, num_clients)
    params, _ = run_he_round(strategy, secret, models[0], models, weights)
    aggregate = decrypt(secret, params, shapes)
    for i, shape in enumerate(shapes):
        expected = sum(w * m[i].astype(np.float64) for w, m in zip(weights, models)) / sum(weights)
        assert aggregate[i].shape == shape
        np.testing.assert_allclose(aggregate[i], expected, rtol=0, atol=1e-4)
        # the bound the docs give: 0.5 / 2^scale_bits on the weighted mean
        assert np.max(np.abs(aggregate[i] - expected)) <= 0.5 / PARAMS.scale + 1e-12


def test_sizes_and_bytes_per_parameter_at_one_million_parameters(keys):
    secret, public = keys
    shapes = [(1000, 1000), (1000,)]
    rng = np.random.default_rng(0)
    models = [[rng.normal(0, 0.05, s).astype(np.float32) for s in shapes] for _ in range(3)]
    strategy = he_fedavg(public, 3)
    params, _ = run_he_round(strategy, secret, models[0], models, [10, 20, 30])
    report = strategy.round_report(1)["secagg"]
    assert report["ciphertexts_per_model"] == math.ceil(1_001_000 / 4096)
    assert report["bytes_per_parameter_up"] <= 8.0  # seeded symmetric ciphertexts
    assert report["bytes_per_parameter_down"] <= 16.0  # a sum has no seed: both halves
    aggregate = decrypt(secret, params, shapes)
    expected = (10 * models[0][0] + 20 * models[1][0] + 30 * models[2][0]) / 60
    assert np.max(np.abs(aggregate[0] - expected)) < 1e-5


# ------------------------------------------------------------------ keys
def test_server_context_has_no_secret_key_and_cannot_decrypt(keys, tmp_path):
    secret, _ = keys
    secret_path, public_path = provision(PARAMS, tmp_path)
    public = load_context(public_path)
    assert not public.is_secret and public.secret_key is None
    assert load_context(secret_path).is_secret
    assert public.fingerprint == load_context(secret_path).fingerprint
    # the public file is the parameters alone: no key material of any kind
    assert public_path.stat().st_size < 1024 < secret_path.stat().st_size
    assert secret_path.stat().st_mode & 0o077 == 0  # readable by its owner only
    payload = encrypt_update(load_context(secret_path), [np.ones(10, np.float32)], 1, 1)
    header, _ = unpack_payload(payload)
    header = {**header, "kind": "aggregate", "divisor": 1}
    with pytest.raises(HEError, match="no secret key"):
        decrypt_model(public, pack_payload(header, unpack_payload(payload)[1]), [(10,)])
    with pytest.raises(HEError, match="no secret key"):
        encrypt_update(public, [np.ones(10, np.float32)], 1, 1)


def test_strategy_refuses_a_secret_context(keys):
    with pytest.raises(HEError, match="only the public context"):
        HomomorphicAggregation(FedAvg(), keys[0])


def test_a_node_with_other_keys_gets_a_clear_error(keys):
    secret, public = keys
    strategy = he_fedavg(public, 2)
    model = [np.ones((3, 3), np.float32)]
    params, _ = run_he_round(strategy, secret, model, [model, model], [1, 1])
    with pytest.raises(HEError, match="other keys"):
        decrypt(new_context(PARAMS), params, [(3, 3)])


# ------------------------------------------------------------------ robustness
SHAPES = [(40, 30), (30,)]


def models_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, 0.3, s).astype(np.float32) for s in SHAPES] for _ in range(n)]


def test_dropouts_leave_the_survivors_weighted_mean(keys):
    secret, public = keys
    strategy = he_fedavg(public, 5)
    models = models_for(5)
    weights = [10, 20, 30, 40, 50]
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), manager(5))
    survivors = [0, 2, 3]
    results = [
        (sent[i][0], fit_res(encrypt_update(secret, models[i], weights[i], 1), weights[i]))
        for i in survivors
    ]
    failures = [RuntimeError("node dropped"), RuntimeError("node dropped")]
    params, _ = strategy.aggregate_fit(1, results, failures)
    aggregate = decrypt(secret, params, SHAPES)
    total = sum(weights[i] for i in survivors)
    expected = sum(weights[i] * models[i][0].astype(np.float64) for i in survivors) / total
    np.testing.assert_allclose(aggregate[0], expected, atol=1e-4)
    assert strategy.round_report(1)["secagg"]["clients_aggregated"] == 3


def corrupt(payload, how, secret):
    header, ciphertexts = unpack_payload(payload)
    if how == "truncated":
        return [payload[0], payload[1][:-200]]
    if how == "garbage ciphertext":
        junk = [bytes(len(ciphertexts[0]))] + ciphertexts[1:]
        return pack_payload({k: v for k, v in header.items() if k != "lengths"}, junk)
    if how == "garbage header":
        return [np.frombuffer(b'{"algorithm": oops', np.uint8).copy(), payload[1]]
    if how == "missing ciphertext":
        return pack_payload({k: v for k, v in header.items() if k != "lengths"}, ciphertexts[:-1])
    if how == "other parameters":  # a ciphertext under N=2048 keys
        other = new_context(HEParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(54,)))
        foreign = encrypt_update(other, [np.ones(10, np.float32)], 1, 1)
        _, foreign_cts = unpack_payload(foreign)
        fields = {k: v for k, v in header.items() if k != "lengths"}
        return pack_payload(fields, foreign_cts[:1] + ciphertexts[1:])
    raise AssertionError(how)


def tampered(secret, model, weight, server_round, how):
    """An update that is wrong in one way: its tags or its bytes."""
    if how == "wrong round":
        return encrypt_update(secret, model, weight, server_round + 1)
    if how == "wrong keys":
        return encrypt_update(new_context(PARAMS), model, weight, server_round)
    if how == "wrong layout":
        return encrypt_update(secret, [m.reshape(-1) for m in model], weight, server_round)
    if how == "wrong weight":
        return encrypt_update(secret, model, weight + 1, server_round)
    return corrupt(encrypt_update(secret, model, weight, server_round), how, secret)


BAD = [
    "wrong round", "wrong keys", "wrong layout", "wrong weight", "truncated",
    "garbage ciphertext", "garbage header", "missing ciphertext", "other parameters",
]  # fmt: skip


@pytest.mark.parametrize("how", BAD)
def test_a_bad_update_is_rejected_with_the_node_named_and_the_round_goes_on(keys, how, caplog):
    secret, public = keys
    strategy = he_fedavg(public, 3)
    models = models_for(3, seed=1)
    sent = strategy.configure_fit(4, ndarrays_to_parameters(models[0]), manager(3))
    results = [
        (sent[0][0], fit_res(encrypt_update(secret, models[0], 10, 4), 10)),
        (sent[1][0], fit_res(tampered(secret, models[1], 20, 4, how), 20)),
        (sent[2][0], fit_res(encrypt_update(secret, models[2], 30, 4), 30)),
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        params, _ = strategy.aggregate_fit(4, results, [])
    assert params is not None
    expected = (10 * models[0][0].astype(np.float64) + 30 * models[2][0]) / 40
    np.testing.assert_allclose(decrypt(secret, params, SHAPES)[0], expected, atol=1e-4)
    (reason,) = strategy.rejected[4]
    assert reason.startswith(f"node {sent[1][0].cid}:")
    assert strategy.round_report(4)["secagg"]["clients_aggregated"] == 2


def test_no_valid_update_skips_the_round_and_keeps_the_model(keys):
    secret, public = keys
    strategy = he_fedavg(public, 2)
    models = models_for(2)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), manager(2))
    results = [
        (proxy, fit_res(encrypt_update(secret, models[0], 5, 2), 5)) for proxy, _ in sent
    ]  # tagged with round 2 in round 1
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert len(strategy.rejected[1]) == 2


def test_a_total_weight_that_would_overflow_skips_the_round(keys):
    secret, public = keys
    strategy = he_fedavg(public, 2)
    limit = PARAMS.max_total_weight(public.plain_modulus)
    model = [np.full(5, 0.5, np.float32)]
    sent = strategy.configure_fit(1, ndarrays_to_parameters(model), manager(2))
    results = [(proxy, fit_res(encrypt_update(secret, model, limit, 1), limit)) for proxy, _ in sent]
    assert strategy.aggregate_fit(1, results, []) == (None, {})


def test_a_client_refuses_values_beyond_max_abs_value(keys):
    with pytest.raises(HEError, match="max_abs_value"):
        encrypt_update(keys[0], [np.array([0.0, 9.0], np.float32)], 1, 1)
    with pytest.raises(HEError, match="max_abs_value"):
        encrypt_update(keys[0], [np.array([0.0, np.nan], np.float32)], 1, 1)


def test_centralized_evaluation_only_of_a_plaintext_model(keys):
    secret, public = keys
    calls = []
    base = FedAvg(evaluate_fn=lambda r, w, c: calls.append(r) or (0.0, {}))
    strategy = HomomorphicAggregation(base, public)
    model = [np.ones(4, np.float32)]
    assert strategy.evaluate(0, ndarrays_to_parameters(model)) == (0.0, {})
    encrypted = ndarrays_to_parameters(encrypt_update(secret, model, 1, 1))
    assert strategy.evaluate(1, encrypted) is None and calls == [0]


# ------------------------------------------------------------------ with DP
def dp_over_he(public, m, z, c=1.0, seed=0):
    return EncryptedClientSideClipping(
        he_fedavg(public, m), noise_multiplier=z, clipping_norm=c, target_delta=1e-5,
        noise=np.random.default_rng(seed), sampling="without_replacement",
    )  # fmt: skip


@pytest.mark.parametrize("z,c,m", [(1.0, 1.0, 5), (0.5, 0.2, 8)])
def test_noise_on_the_encrypted_sum_has_std_z_c_over_k(keys, z, c, m):
    secret, public = keys
    wrapper = dp_over_he(public, m, z, c, seed=3)
    g = [np.zeros(s, np.float32) for s in SHAPES]
    draws = []
    for r in range(1, 4):
        sent = wrapper.configure_fit(r, ndarrays_to_parameters(g), manager(m))
        assert sent[0][1].config["he_weighting"] == "uniform"
        assert sent[0][1].config["dp_clipping_norm"] == c
        results = [(p, fit_res(encrypt_update(secret, g, 1, r), 7)) for p, _ in sent]
        params, _ = wrapper.aggregate_fit(r, results, [])
        noised = decrypt(secret, params, SHAPES, allow_noise=True)
        draws.append(np.concatenate([a.ravel() for a in noised]))
    draws = np.concatenate(draws)
    assert np.std(draws) == pytest.approx(z * c / m, rel=0.05)
    report = wrapper.round_report(3)["privacy"]
    assert report["clients_aggregated"] == m and report["epsilon"] > 0


def test_accounting_under_he_equals_the_plaintext_mechanism(keys):
    secret, public = keys
    he = dp_over_he(public, 4, 1.2)
    plain = ClientSideFixedClipping(
        FedAvg(fraction_fit=0.4, min_fit_clients=2, min_available_clients=2),
        noise_multiplier=1.2, clipping_norm=1.0, target_delta=1e-5,
        sampling="without_replacement",
    )  # fmt: skip
    he.strategy.strategy.fraction_fit = 0.4
    g = [np.zeros(s, np.float32) for s in SHAPES]
    for r in (1, 2, 3):
        for wrapper in (he, plain):
            sent = wrapper.configure_fit(r, ndarrays_to_parameters(g), manager(10))
            if wrapper is he:
                payloads = [encrypt_update(secret, g, 1, r) for _ in sent]
            else:
                payloads = [g for _ in sent]
            results = [(p, fit_res(x, 5)) for (p, _), x in zip(sent, payloads)]
            wrapper.aggregate_fit(r, results, [])
        assert he.round_report(r)["privacy"]["epsilon"] == pytest.approx(
            plain.round_report(r)["privacy"]["epsilon"]
        )


def test_zero_noise_dp_over_he_is_the_uniform_mean(keys):
    secret, public = keys
    wrapper = dp_over_he(public, 3, 0.0)
    models = models_for(3, seed=5)
    sent = wrapper.configure_fit(1, ndarrays_to_parameters(models[0]), manager(3))
    results = [
        (p, fit_res(encrypt_update(secret, mdl, 1, 1), n))
        for (p, _), mdl, n in zip(sent, models, (5, 50, 500))
    ]
    params, _ = wrapper.aggregate_fit(1, results, [])
    expected = sum(mdl[0].astype(np.float64) for mdl in models) / 3
    np.testing.assert_allclose(decrypt(secret, params, SHAPES)[0], expected, atol=1e-4)


def test_client_clips_its_encrypted_update_within_c(keys, tmp_path):
    """A real TorchClient under secagg=he privacy=client_fixed: what it encrypts is within C of
    the global model (rounding included), and it trains from the decrypted global model."""
    client, secret, public, initial = he_client(
        tmp_path,
        "secagg=he privacy=client_fixed privacy.clipping_norm=0.05 "
        "privacy.unprotected_metrics=true",  # to read the norm and evaluate on the client
    )
    config = {"server_round": 1, "he_round": 1, "he_weighting": "uniform", "dp_clipping_norm": 0.05}
    payload, n, metrics = client.fit(initial, config)
    assert n == len(client.train_data) and metrics["update_norm"] > 0.05  # it had to clip
    wrapper = dp_over_he(public, 1, 0.0, c=0.05)
    sent = wrapper.configure_fit(1, ndarrays_to_parameters(initial), manager(1))
    params, _ = wrapper.aggregate_fit(1, [(sent[0][0], fit_res(payload, n))], [])
    shapes = [a.shape for a in initial]
    received = decrypt(secret, params, shapes, allow_noise=True)
    norm = math.sqrt(sum(float(np.sum((r - g.astype(np.float64)) ** 2)) for r, g in zip(received, initial)))
    assert 0.04 < norm <= 0.05
    # round 2: the client decrypts the encrypted global model and evaluates it
    loss, _, eval_metrics = client.evaluate(parameters_to_ndarrays(params), config)
    assert loss > 0 and 0 <= eval_metrics["accuracy"] <= 1


# ------------------------------------------------------------------ configuration
# `says` is text only the right error holds: never a piece of the overrides (a composition
# error repeats them), never a word any message holds ("he" is in "the").
@pytest.mark.parametrize(
    "overrides,key,says",
    [
        ("secagg=he privacy=server_fixed", "privacy.name", "the server cannot see updates, so it cannot clip them"),
        ("secagg=he privacy=adaptive", "privacy.name", "the server cannot see updates, so it cannot clip them"),
        ("secagg=he strategy=fedadam", "strategy.name", "use strategy=fedavg or strategy=fedprox"),
        ("secagg=he strategy=fedavgm", "strategy.name", "use strategy=fedavg or strategy=fedprox"),
        ("secagg=he secagg.coeff_mod_bit_sizes=[60,60]", "secagg.coeff_mod_bit_sizes=[60, 60]",
         "128-bit security allows at most 109 bits in total"),
        ("secagg=he secagg.plain_modulus_bits=52", "with plain_modulus_bits=52",
         ">= plain_modulus_bits + 8 (the noise budget that decryption needs)"),
        ("secagg=he secagg.poly_modulus_degree=3000", "secagg.poly_modulus_degree=3000:",
         "use a power of two >= 1024"),
        ("secagg=he secagg.scale_bits=36", "secagg.max_abs_value=8.0 at scale_bits=36",
         "does not fit plain_modulus_bits=40"),
        ("secagg=he secagg.max_abs_value=0", "secagg.max_abs_value", "secagg.max_abs_value=0.0: must be > 0"),
        ("secagg=he privacy=client_fixed privacy.clipping_norm=0.001 secagg.scale_bits=8",
         "secagg.scale_bits=8:", "the fixed-point rounding of 4810 encrypted values"),
        ("secagg=ckks", "secagg", "Could not find 'secagg/ckks'"),
    ],
)  # fmt: skip
def test_bad_he_settings_fail_before_training(overrides, key, says):
    assert says not in overrides  # the test can fail
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert key in str(err.value) and says in str(err.value)


def test_he_config_composes_with_dp_options():
    for privacy, strategy in [("none", "fedprox"), ("client_fixed", "fedavg"),
                              ("local", "fedprox"), ("dpsgd", "fedavg")]:  # fmt: skip
        cfg = load_config(f"secagg=he privacy={privacy} strategy={strategy}")
        assert he_params(cfg) == PARAMS


def test_dpsgd_client_under_he_returns_an_encrypted_model_and_its_epsilon(keys, tmp_path):
    client, secret, public, initial = he_client(
        tmp_path, "secagg=he privacy=dpsgd privacy.noise_multiplier=1.0 training.local_epochs=1"
    )
    payload, n, metrics = client.fit(initial, {"server_round": 1, "he_round": 1})
    assert metrics["epsilon"] > 0
    strategy = he_fedavg(public, 1)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(initial), manager(1))
    params, _ = strategy.aggregate_fit(1, [(sent[0][0], fit_res(payload, n))], [])
    trained = decrypt(secret, params, [a.shape for a in initial])
    np.testing.assert_allclose(trained[0], get_weights(client.model)[0], atol=1e-4)
    assert not np.allclose(trained[0], initial[0], atol=1e-3)  # it did train


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(min_value=17, max_value=60),
    n=st.integers(min_value=1, max_value=9000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_the_mac_tag_and_the_masked_addition_are_exact_mod_t(bits, n, seed):
    """linear_tag (float64 blocks where 2h <= 44, uint64 rows above), _add_mod (int64) and
    add_mod_t (uint64, the masks' sums) agree with Python's exact integers for every modulus width SEAL allows, at the range's
    edges too (values at +-t/2, keys and masks at t - 1)."""
    from protections.he.client import _add_mod
    from protections.he.context import add_mod_t, linear_tag

    rng = np.random.default_rng(seed)
    t = int(rng.integers(1 << (bits - 1), 1 << bits))
    keys = rng.integers(0, t, n, dtype=np.uint64)
    values = rng.integers(-(t // 2), t // 2 + 1, n, dtype=np.int64)
    mask = rng.integers(0, t, n, dtype=np.uint64)
    values[:2], keys[:1], mask[:2] = [t // 2, -(t // 2)][:n], [t - 1], [t - 1, t - 1][:n]
    exact = sum(int(k) * (int(v) % t) for k, v in zip(keys, values)) % t
    assert linear_tag(keys, values, t) == exact
    masked = [(int(v) + int(m)) % t for v, m in zip(values, mask)]
    assert _add_mod(values, mask, t).tolist() == [x - t if x > t // 2 else x for x in masked]
    other = rng.integers(0, t + 1, n, dtype=np.uint64)  # a negated mask t - m lies in [1, t]
    other[:1] = [t]
    expected = [(int(a) + int(b)) % t for a, b in zip(mask, other)]
    assert add_mod_t(mask.copy(), other, t).tolist() == expected
