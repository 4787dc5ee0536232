"""HE aggregation against hostile participants (issue 14): no client input raises out of
`aggregate_fit`, every rejection is recorded with the node and the reason, replays and
duplicates are refused, the weight is the decrypted one and capped, key holders detect a
tampered / overflowed / lied-about aggregate and the server rolls back one round; and a fuzz
of a few thousand mutated payloads where no exception escapes and no corruption is silent."""

import dataclasses
import json
import logging
import struct

import numpy as np
import pytest
import tenseal.sealapi as seal
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from protections.he.context import HEParams, load_ciphertext, new_context, pack_payload, unpack_payload
from protections.he.client import BAD_AGGREGATE_METRIC, BadAggregate, decrypt_model, encrypt_update
from protections.dp.server import EncryptedClientSideClipping
from protections.he.server import HomomorphicAggregation
from tests.support.proxies import InProcessProxy, manager

# unit tier, except the full-size fuzz (integration)

PARAMS = HEParams()
PARAMS_T = {"t": new_context(PARAMS).plain_modulus}  # t depends on the parameters only
SHAPES = [(20, 5), (7,)]  # 107 values: one ciphertext


@pytest.fixture(scope="module")
def keys():
    secret = new_context(PARAMS)
    return secret, secret.public()


def strategy_for(public, m, **kwargs):
    base = FedAvg(fraction_fit=1.0, min_fit_clients=m, min_available_clients=m)
    return HomomorphicAggregation(base, public, **kwargs)


def fit_res(payload, n, metrics=None):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), n, metrics or {})


def models_for(n, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, spread, s).astype(np.float32) for s in SHAPES] for _ in range(n)]


def decrypt(secret, params, **kwargs):
    return decrypt_model(secret, parameters_to_ndarrays(params), SHAPES, **kwargs)


def with_header(payload, **changes):
    header, cts = unpack_payload(payload)
    header = {k: v for k, v in {**header, **changes}.items() if k != "lengths"}
    return pack_payload(header, cts)


def relaxed(secret, **params):
    """The same keys with other encoding limits: what a hostile key holder can encrypt."""
    return dataclasses.replace(secret, params=dataclasses.replace(secret.params, **params))


# ------------------------------------------------------------------ SEAL's format by hand
def seal_header(body_len, compr=0):
    return struct.pack("<HBBBBHQ", 0xA15E, 0x10, 4, 3, compr, 0, 16 + body_len)


def uncompressed(ct, ntt=None, size=None, n=None, levels=None, scale=None, cf=1, coeffs=None, pid=None):
    """SEAL 4's Ciphertext serialization with compression off (a client may send this:
    SEAL loads it), every metadata field settable. Layout: parms_id (4 x u64), is_ntt_form
    (u8), size, poly_modulus_degree, coeff_modulus_size (u64), scale (f64), correction
    factor (u64), then the coefficients as a DynArray (its own header, u64 count, u64s)."""
    k = ct.size() * ct.coeff_modulus_size() * ct.poly_modulus_degree()
    data = np.array([ct[i] for i in range(k)], np.uint64) if coeffs is None else coeffs
    arr = struct.pack("<Q", data.size) + data.astype("<u8").tobytes()
    body = struct.pack("<4Q", *(pid or ct.parms_id()))
    body += struct.pack("<B", int(ct.is_ntt_form()) if ntt is None else ntt)
    body += struct.pack(
        "<QQQ",
        ct.size() if size is None else size,
        ct.poly_modulus_degree() if n is None else n,
        ct.coeff_modulus_size() if levels is None else levels,
    )
    body += struct.pack("<dQ", ct.scale if scale is None else scale, cf)
    body += seal_header(len(arr)) + arr
    return seal_header(len(body)) + body


def replace_ciphertext(payload, data):
    header, _ = unpack_payload(payload)
    return pack_payload({k: v for k, v in header.items() if k != "lengths"}, [data])


def round_with(strategy, public, secret, bad, server_round=1, honest_weight=10, models=None):
    """Round `server_round` with one honest client (node 0) and `bad` (a payload, its
    num_examples) from node 1; returns (params, rejections, honest model)."""
    models = models or models_for(2, seed=server_round)
    sent = strategy.configure_fit(server_round, ndarrays_to_parameters(models[0]), manager(2))
    results = [
        (sent[0][0], fit_res(encrypt_update(secret, models[0], honest_weight, server_round), honest_weight)),
        (sent[1][0], fit_res(*bad)),
    ]
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return params, strategy.rejected_updates(server_round), models[0], sent


# ------------------------------------------------------------------ 1. fields SEAL does not check
@pytest.mark.parametrize(
    "field,says",
    [
        (dict(ntt=1), "NTT"),
        (dict(scale=2.0), "does not load"),  # SEAL's own check, kept
        (dict(cf=3), "does not load"),
        (dict(size=3), "does not load"),
        ("coeff=q", "does not load"),
        ("coeff=max", "does not load"),
        ("other level", "does not load"),
    ],
)
def test_every_ciphertext_field_is_validated_and_the_round_goes_on(keys, field, says):
    secret, public = keys
    strategy = strategy_for(public, 2)
    model = models_for(1, seed=9)[0]
    payload = encrypt_update(secret, model, 3, 1)
    ct = load_ciphertext(public, unpack_payload(payload)[1][0])
    q = public.seal_context.first_context_data().parms().coeff_modulus()[0].value()
    coeffs = np.array([ct[i] for i in range(2 * PARAMS.poly_modulus_degree)], np.uint64)
    if field == "coeff=q":
        coeffs[17] = q
        data = uncompressed(ct, coeffs=coeffs)
    elif field == "coeff=max":
        coeffs[5000] = np.uint64(2**64 - 1)
        data = uncompressed(ct, coeffs=coeffs)
    elif field == "other level":
        data = uncompressed(ct, pid=[1, 2, 3, 4])
    else:
        data = uncompressed(ct, **field)
    params, rejected, honest, sent = round_with(strategy, public, secret, (replace_ciphertext(payload, data), 3))
    assert params is not None  # before: the NTT flag raised "NTT form mismatch" out of aggregate_fit
    ((node, why),) = rejected
    assert node == sent[1][0].cid and says in why
    np.testing.assert_allclose(decrypt(secret, params)[0], honest[0], atol=1e-4)
    # the untouched uncompressed form is accepted: the refusals above are the field's
    ok, rejected, _, _ = round_with(strategy_for(public, 2), public, secret, (replace_ciphertext(payload, uncompressed(ct)), 3))
    assert rejected == [] and ok is not None


def test_an_error_while_summing_rejects_that_client_only(keys, monkeypatch):
    """A ciphertext that passes every check but that SEAL still refuses to add (here: one of
    other parameters, slipped past the loader) rejects its client; the round goes on."""
    import protections.he.server as module

    secret, public = keys
    other = new_context(HEParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(54,)))
    foreign = load_ciphertext(other.public(), unpack_payload(encrypt_update(other, [np.ones(3, np.float32)], 1, 1))[1][0])
    real = module.load_ciphertext
    calls = []

    def sneaky(ctx, data):
        calls.append(1)
        return foreign if len(calls) == 2 else real(ctx, data)

    monkeypatch.setattr(module, "load_ciphertext", sneaky)
    models = models_for(2, seed=4)
    strategy = strategy_for(public, 2)
    params, rejected, honest, sent = round_with(strategy, public, secret, (encrypt_update(secret, models[1], 5, 1), 5), models=models)
    ((node, why),) = rejected
    assert node == sent[1][0].cid and "do not add" in why
    np.testing.assert_allclose(decrypt(secret, params)[0], honest[0], atol=1e-4)


# ------------------------------------------------------------------ 2. replays and duplicates
def test_a_replayed_ciphertext_with_an_edited_round_tag_is_rejected(keys):
    secret, public = keys
    strategy = strategy_for(public, 2)
    models = models_for(2, seed=2)
    old = encrypt_update(secret, models[1], 4, 1)
    params, rejected, _, _ = round_with(strategy, public, secret, (old, 4), server_round=1, models=models)
    assert rejected == []
    replay = with_header(old, round=2)
    params, rejected, honest, sent = round_with(strategy, public, secret, (replay, 4), server_round=2, models=models)
    ((node, why),) = rejected
    assert node == sent[1][0].cid and "replayed" in why and "round 1" in why
    np.testing.assert_allclose(decrypt(secret, params)[0], honest[0], atol=1e-4)



def test_a_replay_from_before_a_restart_is_still_rejected(keys, tmp_path):
    """Resume under HE (app/checkpoint.py): the seeds summed before the checkpoint come back
    with the layer's state, so round 1's ciphertext replayed into round 2 of a resumed stack
    is refused as it is without the restart."""
    from app.checkpoint import load, save

    secret, public = keys
    first = strategy_for(public, 2)
    models = models_for(2, seed=2)
    old = encrypt_update(secret, models[1], 4, 1)
    params, rejected, _, _ = round_with(first, public, secret, (old, 4), server_round=1, models=models)
    assert rejected == []
    save(tmp_path, 1, parameters_to_ndarrays(params), first.state_dict(), {}, "{}")
    resumed = strategy_for(public, 2)
    resumed.load_state_dict(load(tmp_path).strategy_state)
    replay = with_header(old, round=2)
    params, rejected, honest, sent = round_with(resumed, public, secret, (replay, 4), server_round=2, models=models)
    ((node, why),) = rejected
    assert node == sent[1][0].cid and "replayed ciphertext" in why and "round 1" in why
    np.testing.assert_allclose(decrypt(secret, params)[0], honest[0], atol=1e-4)
    fresh = strategy_for(public, 2)  # what the state carried: without it the replay is summed
    assert round_with(fresh, public, secret, (replay, 4), server_round=2, models=models)[1] == []

def test_the_same_ciphertext_twice_is_summed_once(keys):
    secret, public = keys
    strategy = strategy_for(public, 3)
    models = models_for(3, seed=3)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), manager(3))
    a = encrypt_update(secret, models[0], 10, 1)
    b = encrypt_update(secret, models[1], 30, 1)
    results = [(sent[0][0], fit_res(a, 10)), (sent[1][0], fit_res(b, 30)), (sent[2][0], fit_res(a, 10))]
    params, _ = strategy.aggregate_fit(1, results, [])
    ((node, why),) = strategy.rejected_updates(1)
    assert node == sent[2][0].cid and "duplicate" in why
    expected = (10 * models[0][0].astype(np.float64) + 30 * models[1][0]) / 40
    np.testing.assert_allclose(decrypt(secret, params)[0], expected, atol=1e-4)  # not (20 a + 30 b)/50


# ------------------------------------------------------------------ 3. the weight
@pytest.mark.parametrize("claim", [10**7, 900_000, 100_001])
def test_a_weight_above_max_weight_rejects_that_client_not_the_round(keys, claim):
    secret, public = keys
    strategy = strategy_for(public, 2)  # secagg.max_weight's default: 100,000
    models = models_for(2, seed=5)
    lie = with_header(encrypt_update(secret, models[1], 1, 1), weight=claim)
    params, rejected, honest, sent = round_with(strategy, public, secret, (lie, claim), models=models)
    assert params is not None  # before: the round was skipped, with no trace in results.json
    ((node, why),) = rejected
    assert node == sent[1][0].cid and "max_weight" in why
    np.testing.assert_allclose(decrypt(secret, params)[0], honest[0], atol=1e-4)  # not shrunk


def test_the_divisor_is_the_decrypted_weight_and_a_lie_is_caught_by_key_holders(keys):
    secret, public = keys
    models = models_for(2, seed=6)
    # claims 900 (within the cap) while encrypting at weight 1: the server cannot tell...
    lie = with_header(encrypt_update(secret, models[1], 1, 1), weight=900)
    params, rejected, _, _ = round_with(strategy_for(public, 2), public, secret, (lie, 900), models=models)
    assert rejected == [] and params is not None
    # ...key holders can: the decrypted weight 11 is not the claimed 910
    with pytest.raises(BadAggregate, match="decrypted total weight 11 differs from the claimed 910"):
        decrypt(secret, params)


def test_total_weight_overflow_rejects_the_client_that_would_overflow(keys):
    secret, public = keys
    limit = PARAMS.max_total_weight(public.plain_modulus)
    strategy = strategy_for(public, 2, max_weight=limit)
    model = [np.full(s, 0.5, np.float32) for s in SHAPES]
    params, rejected, _, sent = round_with(
        strategy, public, secret, (encrypt_update(secret, model, limit, 1), limit), models=[model, model]
    )
    ((node, why),) = rejected
    assert node == sent[1][0].cid and "plaintext modulus" in why
    np.testing.assert_allclose(decrypt(secret, params)[0], model[0], atol=1e-4)


# ------------------------------------------------------------------ 4. out of range -> rollback
def test_an_overflowing_value_is_detected_and_the_server_rolls_back_one_round(keys):
    secret, public = keys
    strategy = strategy_for(public, 3)
    models = models_for(3, seed=7)
    cm = manager(3)
    # round 1: honest; its aggregate is round 2's global model
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), cm)
    r1 = [(p, fit_res(encrypt_update(secret, m, 5, 1), 5)) for (p, _), m in zip(sent, models)]
    good, _ = strategy.aggregate_fit(1, r1, [])
    # round 2: node 2 encrypts a value far beyond max_abs_value, just inside what one
    # plaintext holds (t/2 at weight 5); the sum is out of range (or wraps t)
    sent = strategy.configure_fit(2, good, cm)
    hostile = relaxed(secret, max_abs_value=1e9)
    bad_model = [m.copy() for m in models[2]]
    bad_model[0][3, 1] = 0.999 * 2.0**39 / (5 * PARAMS.scale)
    r2 = [(p, fit_res(encrypt_update(secret, models[i], 5, 2), 5)) for i, (p, _) in enumerate(sent[:2])]
    r2.append((sent[2][0], fit_res(encrypt_update(hostile, bad_model, 5, 2), 5)))
    bad, _ = strategy.aggregate_fit(2, r2, [])
    with pytest.raises(BadAggregate, match="max_abs_value") as err:
        decrypt(secret, bad)
    # round 3: the key holders report instead of training; the server restores round 2's model
    sent = strategy.configure_fit(3, bad, cm)
    r3 = [(p, fit_res([], 0, {BAD_AGGREGATE_METRIC: str(err.value)})) for p, _ in sent]
    restored, _ = strategy.aggregate_fit(3, r3, [])
    assert restored is good and strategy.rolled_back(3)  # the last model the clients accepted
    report = strategy.round_report(3)["secagg"]["rolled_back"]
    assert report["reports"] == 3 and "max_abs_value" in report["reason"]
    assert {node for node, _ in strategy.rejected_updates(3)} == {p.cid for p, _ in sent}
    # round 4 goes on from the restored model: one bad round cost one round
    sent = strategy.configure_fit(4, restored, cm)
    plain = decrypt(secret, restored)
    r4 = [(p, fit_res(encrypt_update(secret, plain, 5, 4), 5)) for p, _ in sent]
    params, _ = strategy.aggregate_fit(4, r4, [])
    assert strategy.rejected_updates(4) == []
    np.testing.assert_allclose(decrypt(secret, params)[0], plain[0], atol=1e-4)


def test_a_minority_report_does_not_roll_back(keys):
    secret, public = keys
    strategy = strategy_for(public, 3)
    models = models_for(3, seed=8)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), manager(3))
    results = [(p, fit_res(encrypt_update(secret, m, 5, 1), 5)) for (p, _), m in zip(sent[:2], models)]
    results.append((sent[2][0], fit_res([], 0, {BAD_AGGREGATE_METRIC: "a lie"})))
    params, _ = strategy.aggregate_fit(1, results, [])
    assert not strategy.rolled_back(1)
    ((node, why),) = strategy.rejected_updates(1)
    assert node == sent[2][0].cid and "refused the global model: a lie" in why
    expected = (models[0][0].astype(np.float64) + models[1][0]) / 2
    np.testing.assert_allclose(decrypt(secret, params)[0], expected, atol=1e-4)


def test_a_rollback_under_client_level_dp_spends_no_budget(keys):
    secret, public = keys
    dp = EncryptedClientSideClipping(
        strategy_for(public, 2), noise_multiplier=1.0, clipping_norm=0.1, target_delta=1e-5,
        noise=np.random.default_rng(0), sampling="without_replacement",
    )  # fmt: skip
    g = [np.zeros(s, np.float32) for s in SHAPES]
    sent = dp.configure_fit(1, ndarrays_to_parameters(g), manager(2))
    params, _ = dp.aggregate_fit(1, [(p, fit_res(encrypt_update(secret, g, 1, 1), 1)) for p, _ in sent], [])
    assert decrypt(secret, params, allow_noise=True)[0].shape == SHAPES[0]
    with pytest.raises(BadAggregate, match="noise"):  # a node that expects no noise refuses it
        decrypt(secret, params)
    eps = dp.round_report(1)["privacy"]["epsilon"]
    sent = dp.configure_fit(2, params, manager(2))
    restored, _ = dp.aggregate_fit(2, [(p, fit_res([], 0, {BAD_AGGREGATE_METRIC: "bad"})) for p, _ in sent], [])
    assert restored is not None and dp.strategy.rollbacks[2]["reports"] == 2 and dp.rolled_back(2)
    assert dp.accountant is not None and dp.accountant.epsilon == pytest.approx(eps)  # nothing spent


# ------------------------------------------------------------------ 5. integrity
def test_a_forged_ciphertext_under_other_keys_is_detected_by_key_holders(keys):
    secret, public = keys
    models = models_for(2, seed=10)
    forger = new_context(PARAMS)  # same parameters, another secret key
    forged = with_header(encrypt_update(forger, models[1], 4, 1), context=secret.fingerprint)
    params, rejected, _, _ = round_with(strategy_for(public, 2), public, secret, (forged, 4), models=models)
    assert rejected == []  # the server cannot tell (it holds no key)...
    with pytest.raises(BadAggregate, match="MAC"):  # ...the key holders can
        decrypt(secret, params)


def test_a_sum_the_server_edits_is_detected(keys):
    """add_plain of a chosen delta (all a party without the key can do to a sum)."""
    secret, public = keys
    strategy = strategy_for(public, 2)
    models = models_for(2, seed=11)
    params, _, _, _ = round_with(strategy, public, secret, (encrypt_update(secret, models[1], 2, 1), 2), models=models)
    header, cts = unpack_payload(parameters_to_ndarrays(params))
    ct = load_ciphertext(public, cts[0])
    plain = seal.Plaintext()
    delta = [0] * PARAMS.poly_modulus_degree
    delta[0] = 1  # one unit of 2^-16 on one weight
    public.encoder.encode(delta, plain)
    public.evaluator.add_plain_inplace(ct, plain)
    from protections.he.context import seal_to_bytes

    edited = pack_payload({k: v for k, v in header.items() if k != "lengths"}, [seal_to_bytes(ct)])
    with pytest.raises(BadAggregate, match="MAC"):
        decrypt_model(secret, edited, SHAPES)


# ------------------------------------------------------------------ the fuzz
def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def fuzz_cases(secret, public, rng, honest_model, scale=1):
    """(kind, payload, num_examples, seeds_first) mutations of one client's update in round 2."""
    model = honest_model
    w = 6
    base = encrypt_update(secret, model, w, 2)
    header, (data,) = unpack_payload(base)
    ct = load_ciphertext(public, data)
    full = uncompressed(ct)
    cases = []
    for _ in range(1000 * scale):  # single bit flips of the seeded, compressed form (as sent)
        cases.append(("bitflip-seeded", replace_ciphertext(base, _flip(data, int(rng.integers(len(data) * 8)))), w))
    for _ in range(1000 * scale):  # and of the uncompressed form (SEAL loads it too)
        cases.append(("bitflip-raw", replace_ciphertext(base, _flip(full, int(rng.integers(len(full) * 8)))), w))
    for _ in range(200 * scale):
        cut = int(rng.integers(0, len(data)))
        cases.append(("truncation", replace_ciphertext(base, data[:cut] or b"\0"), w))
    for _ in range(50 * scale):
        cases.append(("truncation", [base[0], base[1][: int(rng.integers(0, base[1].size))]], w))
    meta_offsets = list(range(16, 16 + 73))  # the uncompressed body's metadata bytes
    for _ in range(300 * scale):
        off = meta_offsets[int(rng.integers(len(meta_offsets)))]
        b = bytearray(full)
        b[off] = int(rng.integers(256))
        cases.append(("metadata", replace_ciphertext(base, bytes(b)), w))
    for field in ("ntt", "size", "n", "levels", "scale", "cf"):
        for value in (0, 1, 2, 3, 2048, 8192, 2**63):
            kw = {field: float(value) if field == "scale" else value}
            if field == "ntt":
                kw = {"ntt": value % 256}
            cases.append(("metadata", replace_ciphertext(base, uncompressed(ct, **kw)), w))
    edits = [
        ("round", 1), ("round", 3), ("round", "2"), ("weight", 0), ("weight", -6), ("weight", 6.0),
        ("weight", True), ("weight", "6"), ("weight", 10**30), ("kind", "aggregate"),
        ("algorithm", "bfv-batch-seeded/v1"), ("context", "0" * 32), ("layout", "x"),
        ("num_values", 10**9), ("num_values", -1), ("scale_bits", 8), ("lengths", [1, 2]),
    ]  # fmt: skip
    for key, value in edits:
        for _ in range(4 * scale):
            h = {k: v for k, v in header.items()}
            h[key] = value
            cases.append(("header", [np.frombuffer(json.dumps(h).encode(), np.uint8).copy(), base[1]], w))
    for raw in (b'{"algorithm": 1}', b'{"algorithm": [', b'{"algorithm": "x", "lengths": "ab"}', b'{"algorithm"}'):
        cases.append(("header", [np.frombuffer(raw, np.uint8).copy(), base[1]], w))
    cases.append(("header", [base[0]], w))
    cases.append(("header", [base[0], base[1], base[1]], w))
    for claim in (1, 5, 7, 99_999, 100_001, 10**7):  # weight lies (claim != encrypted 6)
        cases.append(("weight-lie", with_header(base, weight=claim), claim))
    forger = new_context(PARAMS)
    for _ in range(10 * scale):
        forged = encrypt_update(forger, model, w, 2)
        cases.append(("forged", with_header(forged, context=secret.fingerprint), w))
    hostile = relaxed(secret, max_abs_value=1e12)
    for peak in (30.0, 100.0, 2.0**20, 0.999 * 2.0**39 / (w * PARAMS.scale), -(2.0**21)):
        bad = [m.copy() for m in model]
        bad[0][0, 0] = peak
        cases.append(("out-of-range", encrypt_update(hostile, bad, w, 2), w))
    cases.append(("duplicate", None, w))
    cases.append(("replay", None, w))
    return cases


@pytest.mark.integration  # the full-size fuzz (over 2,000 cases, 13 s): like the full-size audit
def test_fuzz_no_exception_escapes_every_rejection_is_recorded_no_silent_corruption(keys):
    secret, public = keys
    rng = np.random.default_rng(2024)
    models = models_for(2, seed=12)
    honest = encrypt_update(secret, models[0], 10, 2)
    r1 = encrypt_update(secret, models[1], 6, 1)  # what round 1 summed (for replays)
    expected = [(10 * a.astype(np.float64) + 6 * b) / 16 for a, b in zip(models[0], models[1])]
    cases = fuzz_cases(secret, public, rng, models[1])
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # thousands of rejection lines: half the test's time
    try:
        counts = fuzz(secret, public, models, honest, r1, expected, cases)
    finally:
        flwr_logger.setLevel(level)
    print(json.dumps(counts, indent=1))
    assert len(cases) >= 2000
    assert all(c["silent"] == 0 for c in counts.values()), counts
    for kind in ("truncation", "metadata", "header", "duplicate", "replay"):
        assert counts[kind]["rejected by server"] + counts[kind]["no effect"] == counts[kind]["cases"]
    for kind in ("duplicate", "replay"):
        assert counts[kind]["rejected by server"] == counts[kind]["cases"]
    for kind in ("forged", "out-of-range"):
        assert counts[kind]["detected by key holders"] == counts[kind]["cases"]
    lies = counts["weight-lie"]
    assert lies["rejected by server"] + lies["detected by key holders"] == lies["cases"]
    for kind in ("bitflip-seeded", "bitflip-raw"):  # every flip that changes the sum is caught
        c = counts[kind]
        assert c["rejected by server"] + c["detected by key holders"] + c["no effect"] == c["cases"]


def fuzz(secret, public, models, honest, r1, expected, cases):
    counts: dict[str, dict[str, int]] = {}
    for kind, payload, n in cases:
        strategy = strategy_for(public, 2)
        cm = manager(2)
        if kind == "replay":  # round 1 summed r1; round 2 gets it back with its round edited
            sent1 = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), cm)
            strategy.aggregate_fit(1, [(sent1[1][0], fit_res(r1, 6))], [])
            payload = with_header(r1, round=2)
        if kind == "duplicate":
            payload = honest
        sent = strategy.configure_fit(2, ndarrays_to_parameters(models[0]), cm)
        proxies = [p for p, _ in sent]
        results = [(proxies[0], fit_res(honest, 10)), (proxies[1], fit_res(payload, n))]
        params, _ = strategy.aggregate_fit(2, results, [])  # must not raise
        rejected = strategy.rejected_updates(2)
        c = counts.setdefault(kind, {"cases": 0, "rejected by server": 0, "detected by key holders": 0, "no effect": 0, "silent": 0})
        c["cases"] += 1
        if rejected:
            assert rejected == [(proxies[1].cid, rejected[0][1])] and rejected[0][1]
            c["rejected by server"] += 1
            np.testing.assert_allclose(decrypt(secret, params)[0], models[0][0], atol=1e-4)
            continue
        try:
            got = decrypt(secret, params)
        except BadAggregate:
            c["detected by key holders"] += 1
            continue
        if all(np.max(np.abs(g - e)) <= 1e-4 for g, e in zip(got, expected)):
            c["no effect"] += 1
        else:
            c["silent"] += 1
    return counts


def test_a_client_reports_a_bad_global_model_instead_of_training(keys, tmp_path):
    """A real TorchClient handed an aggregate whose weight was edited: it trains nothing and
    returns the fit metric the server rolls back on."""
    from tests.support.he import he_client

    client, secret, public, initial = he_client(tmp_path, "secagg=he")
    update = encrypt_update(secret, initial, 3, 1)
    bad = with_header(update, kind="aggregate", divisor=4)  # decrypts to weight 3
    before = [a.copy() for a in initial]
    payload, n, metrics = client.fit(bad, {"server_round": 2, "he_round": 2})
    assert payload == [] and n == 0
    assert "decrypted total weight 3 differs from the claimed 4" in metrics[BAD_AGGREGATE_METRIC]
    good = with_header(update, kind="aggregate", divisor=3)
    payload, n, metrics = client.fit(good, {"server_round": 2, "he_round": 2})
    assert BAD_AGGREGATE_METRIC not in metrics and n > 0 and len(payload) == 2
    assert all(np.array_equal(a, b) for a, b in zip(before, initial))


# ------------------------------------------------------------------ a run with a hostile client
class HostileProxy(InProcessProxy):
    """A real node that trains honestly, then sends each round's attack instead (it holds
    the secret key, as every SuperNode does)."""

    def __init__(self, cid, client, secret_path):
        from protections.he.context import load_context

        super().__init__(cid, client)
        self.secret = load_context(secret_path)
        self.sent: dict[int, list] = {}

    def fit(self, ins, timeout, group_id):
        from flwr.common import GetParametersIns

        res = super().fit(ins, timeout, group_id)
        r = int(ins.config["he_round"])
        payload = parameters_to_ndarrays(res.parameters)
        if not payload:  # it refused the model like everyone (the round after its overflow)
            return res
        attack = {1: "ntt", 2: "weight", 3: "overflow", 5: "replay"}.get(r)
        header, (first, *rest) = unpack_payload(payload)
        fields = {k: v for k, v in header.items() if k != "lengths"}
        if attack == "ntt":
            ct = load_ciphertext(self.secret.public(), first)
            payload = pack_payload(fields, [uncompressed(ct, ntt=1), *rest])
        elif attack == "weight":
            payload, res.num_examples = with_header(payload, weight=10**7), 10**7
        elif attack == "overflow":
            shapes = [a.shape for a in parameters_to_ndarrays(self.client.get_parameters(GetParametersIns({})).parameters)]
            big = [np.full(s, 0.999 * 2.0**39 / (res.num_examples * PARAMS.scale)) for s in shapes]
            wide = relaxed(self.secret, max_abs_value=1e12)
            payload = encrypt_update(wide, big, res.num_examples, r, mask=self.own_mask(r, shapes))
        elif attack == "replay":
            payload = with_header(self.sent[3], round=r)
        self.sent[r] = payload
        res.parameters = ndarrays_to_parameters(payload)
        return res


    def own_mask(self, server_round, shapes):
        """The double mask this node applied this round (pairwise masks are on by default):
        a key holder forging its own payload re-applies it, so the server's unmasking fits
        and only the key holders' checks stand between the forgery and the model."""
        from protections.he.context import layout_hash
        from protections.he.masks import node_mask

        node = self.client.numpy_client.state_context.state
        n = sum(int(np.prod(s)) for s in shapes)
        return node_mask(self.secret, node, server_round, layout_hash(shapes), n)


def in_process_run(overrides, out, nodes, hostile_cls=None, num_rounds=6):
    """ExperimentServer + the configured strategy stack over `nodes` real clients (node 10x,
    partition x of 3), in this process; the last node is `hostile_cls` when given. Returns the
    recorded rounds and the decrypted final model's centralized accuracy."""
    import torch
    from flwr.common import Context, RecordDict

    from app.client_app import build_client
    from app.config import load_config
    from protections.he.config import he_params
    from core.data import centralized_test_split, data_spec
    from core.evaluation import evaluate
    from app.experiment_server import ExperimentServer, NodeTrackingClientManager
    from core.finetune import build_finetune_model
    from protections.he.context import HE_SECRET_PATH_KEY, load_context, provision
    from core.models import get_weights, set_weights
    from core.results import RunRecorder
    from strategies.factory import build_strategy

    cfg = load_config(overrides)
    spec = data_spec(cfg.dataset)
    test = centralized_test_split(cfg.dataset, cfg.seed)
    secret_path, public_path = provision(he_params(cfg), out / "keys")
    model, wire = build_finetune_model(cfg.model, spec, seed=cfg.seed)
    strategy = build_strategy(
        cfg, ndarrays_to_parameters(get_weights(model, wire)), None,
        he_context=load_context(public_path), he_client_config={HE_SECRET_PATH_KEY: str(secret_path)},
    )  # fmt: skip
    recorder = RunRecorder(out, cfg, token="t")
    cm = NodeTrackingClientManager()
    proxies = []
    for i in range(nodes):
        ctx = Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                      node_config={"partition-id": i, "num-partitions": 3})  # fmt: skip
        client = build_client(cfg, ctx)
        if hostile_cls is not None and i == nodes - 1:
            proxies.append(hostile_cls(str(100 + i), client, secret_path))
        else:
            proxies.append(InProcessProxy(str(100 + i), client))
        cm.register(proxies[-1])
    server = ExperimentServer(client_manager=cm, strategy=strategy, recorder=recorder)
    server.fit(num_rounds=num_rounds, timeout=None)
    shapes = [a.shape for a in get_weights(model, wire)]
    final = decrypt_model(load_context(secret_path), parameters_to_ndarrays(server.parameters), shapes)
    set_weights(model, final, wire)
    return recorder.rounds, evaluate(model, test, spec.task, torch.device("cpu"))["accuracy"]


def test_a_run_with_one_hostile_client_completes_and_matches_a_clean_run(tmp_path):
    """3 real clients, 6 rounds; node 102 sends an NTT-flagged ciphertext (round 1), a weight
    of 10^7 (2), a value that overflows t (3), and replays round 3's ciphertext (5). The run
    completes all rounds, round 4 rolls back, every rejection is in the records, and the final
    model scores within 2 points of the run without the attacker (the two honest nodes)."""
    overrides = "secagg=he strategy.fraction_train=1.0 strategy.fraction_evaluate=0"
    rounds, hostile_acc = in_process_run(overrides, tmp_path / "hostile", 3, HostileProxy)
    _, clean_acc = in_process_run(overrides, tmp_path / "clean", 2)
    print(f"final accuracy with the hostile node {hostile_acc:.4f}, without it {clean_acc:.4f}")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    failures = {r["round"]: r["clients"].get("failures", []) for r in rounds}
    reasons = {r: " | ".join(f["reason"] for f in fs if f["node_id"] == "102") for r, fs in failures.items()}
    assert "NTT form flag" in reasons[1]
    assert "max_weight" in reasons[2]
    assert failures[3] == []  # the overflow is accepted: the server cannot see it ...
    assert rounds[3]["rolled_back"] and rounds[3]["secagg"]["rolled_back"]["reports"] == 3  # ... the key holders can
    assert "max_abs_value" in rounds[3]["secagg"]["rolled_back"]["reason"]
    assert {f["node_id"] for f in failures[4]} == {"100", "101", "102"}
    assert "replayed" in reasons[5]
    assert failures[6] == [] and all(r["aggregated"] for r in rounds if r["round"] != 4)
    assert clean_acc >= 0.8 and abs(hostile_acc - clean_acc) <= 0.02, (hostile_acc, clean_acc)


@pytest.mark.parametrize(
    "edit",
    [dict(num_values=-3), dict(num_values=10**9), dict(num_values="x"), dict(round=None),
     dict(divisor=0), dict(divisor="11"), dict(noised=True)],
)  # fmt: skip
def test_a_malformed_aggregate_header_is_a_bad_aggregate_never_another_error(keys, edit):
    secret, public = keys
    models = models_for(2, seed=13)
    params, _, _, _ = round_with(strategy_for(public, 2), public, secret, (encrypt_update(secret, models[1], 1, 1), 1), models=models)
    edited = with_header(parameters_to_ndarrays(params), **edit)
    with pytest.raises(BadAggregate):
        decrypt_model(secret, edited, SHAPES)


# ------------------------------------------------------------------ pairwise masks (core)
def test_pairwise_masks_cancel_in_the_sum_and_hide_one_update_from_a_colluding_key_holder(keys):
    """Three clients mask with X25519 pairwise seeds: the decrypted sum is the exact weighted
    mean (the MAC still verifies); one client's ciphertext, decrypted alone by a key holder
    colluding with the server, is uniform mod t whatever the update (chi-square, 32 bins)."""
    from protections.he.context import layout_hash, mask_keypair, pairwise_mask

    secret, public = keys
    t = public.plain_modulus
    shapes = [(3000,)]
    n = 3000
    layout = layout_hash(shapes)
    pairs = [mask_keypair() for _ in range(3)]
    peers = [pk for _, pk in pairs]
    strategy = HomomorphicAggregation(FedAvg(fraction_fit=1.0, min_fit_clients=3, min_available_clients=3), public)
    updates = [np.zeros(n, np.float32), np.full(n, 7.9, np.float32), np.linspace(-8, 8, n).astype(np.float32)]
    sent = strategy.configure_fit(1, ndarrays_to_parameters([updates[0]]), manager(3))
    payloads = [
        encrypt_update(secret, [u], w, 1, mask=pairwise_mask(secret, sk, pk, peers, 1, layout, n + 1))
        for u, (sk, pk), w in zip(updates, pairs, (2, 3, 5))
    ]
    params, _ = strategy.aggregate_fit(1, [(p, fit_res(x, w)) for (p, _), x, w in zip(sent, payloads, (2, 3, 5))], [])
    mean = decrypt_model(secret, parameters_to_ndarrays(params), shapes)[0]
    expected = sum(w * u.astype(np.float64) for u, w in zip(updates, (2, 3, 5))) / 10
    assert np.max(np.abs(mean - expected)) <= 0.5 / PARAMS.scale + 1e-12
    # the colluding key holder's view of one client: decrypt its ciphertext alone
    for u, payload in zip(updates, payloads):
        header, (data,) = unpack_payload(payload)
        plain = seal.Plaintext()
        secret.decryptor.decrypt(load_ciphertext(public, data), plain)
        slots = np.mod(np.asarray(secret.encoder.decode_int64(plain), np.int64)[: n + 1], t)
        counts = np.bincount((slots.astype(np.float64) / t * 32).astype(int), minlength=32)
        chi2 = float(np.sum((counts - (n + 1) / 32) ** 2 / ((n + 1) / 32)))
        # p = 1e-6 at 31 degrees of freedom, and 5 standard errors of a zero correlation: the
        # masks are fresh every run, and p = 0.001 on each of four checks fails about one run in 250
        assert chi2 < 83.6
        assert abs(np.corrcoef(slots.astype(np.float64), np.append(u, 0))[0, 1] if u.std() else 0.0) < 5 / np.sqrt(n + 1)
    # without masks the same view is the update itself
    header, (data,) = unpack_payload(encrypt_update(secret, [updates[1]], 3, 1))
    plain = seal.Plaintext()
    secret.decryptor.decrypt(load_ciphertext(public, data), plain)
    assert np.allclose(np.asarray(secret.encoder.decode_int64(plain))[:n] / (3 * PARAMS.scale), 7.9, atol=1e-4)


class EavesdroppedProxy(InProcessProxy):
    """An honest node whose every payload a colluding key holder decrypts alone."""

    def __init__(self, cid, client, secret_path):
        from protections.he.context import load_context

        super().__init__(cid, client)
        self.secret = load_context(secret_path)
        self.views: list[np.ndarray] = []
        self.weights: list[int] = []

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        header, cts = unpack_payload(parameters_to_ndarrays(res.parameters))
        slots = []
        for data in cts:
            plain = seal.Plaintext()
            self.secret.decryptor.decrypt(load_ciphertext(self.secret.public(), data), plain)
            slots.append(np.asarray(self.secret.encoder.decode_int64(plain), np.int64))
        self.views.append(np.concatenate(slots)[: header["num_values"]])  # centered, mod t
        self.weights.append(res.num_examples)
        return res


def test_pairwise_masks_in_a_run_train_as_well_and_hide_each_update(tmp_path):
    """secagg.pairwise_masks=true (the default) over 3 real clients: each round collects the
    keys and shares (get_properties), the masks cancel (the run trains as well as without them), and what a
    colluding key holder decrypts from one client's payload is no model (values spread over
    the whole plaintext range instead of within max_abs_value)."""
    overrides = "secagg=he strategy.fraction_train=1.0 strategy.fraction_evaluate=0"
    spies = []

    def spying(cid, client, secret_path):
        spies.append(EavesdroppedProxy(cid, client, secret_path))
        return spies[-1]

    rounds, masked_acc = in_process_run(overrides + " secagg.pairwise_masks=true", tmp_path / "m", 3, spying, num_rounds=3)
    assert all(r["aggregated"] and r["clients"]["trained"] == 3 for r in rounds)
    _, plain_acc = in_process_run(overrides + " secagg.pairwise_masks=false", tmp_path / "p", 3, spying, num_rounds=3)
    assert masked_acc == plain_acc  # the masks cancel exactly: the same training, bit for bit
    t = PARAMS_T["t"]
    masked, plain = spies
    for view, w in zip(masked.views, masked.weights):  # uniform mod t: chi-square, 32 bins
        counts = np.bincount((np.mod(view, t) / t * 32).astype(int), minlength=32)
        chi2 = float(np.sum((counts - view.size / 32) ** 2 / (view.size / 32)))
        assert chi2 < 61.1, chi2  # p = 0.001 at 31 degrees of freedom
    for view, w in zip(plain.views, plain.weights):  # without masks: the model itself
        assert np.max(np.abs(view / (w * PARAMS.scale))) <= PARAMS.max_abs_value


def test_a_dropout_under_masks_is_caught_by_key_holders_not_silently_wrong(keys):
    """Without dropout recovery, a masked client that never returns leaves its masks in the
    sum: the decrypted weight is then noise, key holders refuse the model (rollback)."""
    from protections.he.context import layout_hash, mask_keypair, pairwise_mask

    secret, public = keys
    models = models_for(3, seed=14)
    layout, n = layout_hash(SHAPES), sum(int(np.prod(s)) for s in SHAPES)
    pairs = [mask_keypair() for _ in range(3)]
    peers = [pk for _, pk in pairs]
    strategy = strategy_for(public, 3)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(models[0]), manager(3))
    results = [
        (p, fit_res(encrypt_update(secret, m, 4, 1, mask=pairwise_mask(secret, sk, pk, peers, 1, layout, n + 1)), 4))
        for (p, _), m, (sk, pk) in list(zip(sent, models, pairs))[:2]  # the third dropped
    ]
    params, _ = strategy.aggregate_fit(1, results, [RuntimeError("node dropped")])
    with pytest.raises(BadAggregate, match="weight"):
        decrypt(secret, params)
