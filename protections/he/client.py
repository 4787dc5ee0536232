"""Client side of HE secure aggregation: decrypt the global model, encrypt a weighted update.

A client's contribution is its trained model's tensors, flattened in `state_dict` order,
multiplied by its aggregation weight (its example count under FedAvg, 1 under client-level DP),
scaled by 2^scale_bits, rounded to integers and packed N values per BFV ciphertext (the last
one zero-padded). After the values come three slots: the weight itself and two MAC tags
(protections/he/context.py, "the MAC"). The server adds the ciphertexts and returns the sum with the
claimed total weight in its header; a client decrypts, checks the aggregate (`check_aggregate`:
MAC, decrypted weight equals the claim, values finite and within max_abs_value) and divides by
the DECRYPTED weight. A failed check raises `BadAggregate`; the client reports it to the server
(a fit metric, see clients/torch_client.py), which rolls back to the last good model.
"""

from __future__ import annotations

import math

import numpy as np
import tenseal.sealapi as seal

from protections.he.context import (  # noqa: F401 (BAD_AGGREGATE_METRIC: re-exported for the client)
    BAD_AGGREGATE_METRIC,
    EXTRA_SLOTS,
    TAG_SLOT,
    WEIGHT_SLOT,
    WEIGHT_TAG_SLOT,
    HEContext,
    HEError,
    centered,
    layout_hash,
    linear_tag,
    load_ciphertext,
    mac_keys,
    num_ciphertexts,
    pack_payload,
    payload_header,
    seal_to_bytes,
    unpack_payload,
)




class BadAggregate(HEError):
    """The decrypted aggregate fails a key holder's check: tampered, overflowed or lied about."""


def rounding_slack(num_values: int, params_scale: float) -> float:
    """Largest L2 norm the fixed-point rounding can add to a contribution: 0.5/scale per value.
    Client-level DP clips to C minus this, so the encrypted contribution stays within C."""
    return 0.5 * math.sqrt(num_values) / params_scale


def encrypt_update(
    ctx: HEContext,
    arrays: list[np.ndarray],
    weight: int,
    server_round: int,
    *,
    mask: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Encrypt `weight * arrays` (fixed point) into a tagged payload for the server.
    `mask` (num_values + 1 values mod t, `protections.he.context.pairwise_mask`) is added to the
    values and the weight before the MAC tags are computed; the cohort's masks cancel."""
    if weight <= 0:
        raise HEError(f"aggregation weight {weight} must be > 0")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    if not np.isfinite(peak) or peak > ctx.params.max_abs_value:
        raise HEError(
            f"a model value of magnitude {peak:.4g} exceeds secagg.max_abs_value="
            f"{ctx.params.max_abs_value}: the encrypted sum could overflow. Raise "
            "secagg.max_abs_value (or plain_modulus_bits), or train with a smaller lr"
        )
    quantized = np.rint(flat * (weight * ctx.params.scale)).astype(np.int64)
    layout = layout_hash([np.shape(a) for a in arrays])
    n, t = int(flat.size), ctx.plain_modulus
    slots = ctx.slots
    count = num_ciphertexts(n, slots)
    padded = np.zeros(count * slots, dtype=np.int64)
    padded[:n] = quantized
    # The weight rides inside the ciphertext (the divisor is decrypted, not claimed), followed
    # by the MAC tags over (values, weight) and over the weight alone.
    keys, weight_key = mac_keys(ctx, server_round, layout, n)
    padded[n + WEIGHT_SLOT] = int(weight)
    if mask is not None:
        if mask.shape != (n + 1,):
            raise HEError(f"mask of {mask.shape} values, expected {n + 1}")
        tt = np.uint64(t)
        plain = np.where(padded[: n + 1] < 0, padded[: n + 1] + t, padded[: n + 1]).astype(np.uint64)
        masked = ((plain + mask.astype(np.uint64) % tt) % tt).astype(np.int64)
        padded[: n + 1] = np.where(masked > t // 2, masked - t, masked)
    padded[n + TAG_SLOT] = centered(linear_tag(keys, padded[: n + 1], t), t)
    padded[n + WEIGHT_TAG_SLOT] = centered(weight_key * int(padded[n + WEIGHT_SLOT]), t)
    encoder, encryptor = ctx.encoder, ctx.encryptor
    ciphertexts = []
    for chunk in padded.reshape(count, slots):
        plain = seal.Plaintext()
        encoder.encode(chunk.tolist(), plain)
        # Symmetric encryption returns SEAL's seeded form: half the bytes of a full ciphertext.
        ciphertexts.append(seal_to_bytes(encryptor.encrypt_symmetric(plain)))
    header = payload_header(
        ctx,
        "update",
        layout,
        n,
        server_round,
        weight=int(weight),
    )
    return pack_payload(header, ciphertexts)


def check_aggregate(
    ctx: HEContext, header: dict, slots: np.ndarray, *, allow_noise: bool = False
) -> int:
    """The key holder's check of a decrypted aggregate (`slots`: the decoded int64 values,
    padding included). Returns the decrypted total weight; raises BadAggregate naming what fails.

    - MAC over (values, weight): detects any change to the sum's plaintext by a party without
      the secret key (bit flips, foreign or replayed ciphertexts, a plaintext added by the
      server), except where the server adds DP noise: then (`header["noised"]` and this key
      holder expects it, privacy=client_fixed) only the weight's MAC is checked;
    - the decrypted weight equals the header's divisor (the sum of the weights clients
      claimed): a client that encrypted another weight than it claimed is caught here;
    - every value of the mean is finite and within secagg.max_abs_value: a sum that wrapped
      the plaintext modulus (a value beyond max_abs_value) decodes far out of range."""
    n, t = int(header["num_values"]), ctx.plain_modulus
    if slots.size < n + EXTRA_SLOTS:
        raise BadAggregate(f"aggregate holds {slots.size} slots, {n + EXTRA_SLOTS} expected")
    server_round, layout = int(header["round"]), str(header["layout"])
    keys, weight_key = mac_keys(ctx, server_round, layout, n)
    weight = int(slots[n + WEIGHT_SLOT])
    if (weight_key * weight - int(slots[n + WEIGHT_TAG_SLOT])) % t:
        raise BadAggregate(f"the weight's MAC fails (round {server_round}): the sum was altered")
    noised = bool(header.get("noised", False))
    if noised and not allow_noise:
        raise BadAggregate("the server added noise, which this node's privacy mode does not expect")
    if not noised and (linear_tag(keys, slots[: n + 1], t) - int(slots[n + TAG_SLOT])) % t:
        raise BadAggregate(
            f"the aggregate's MAC fails (round {server_round}): a ciphertext was altered, "
            "forged under other keys, replayed from another round, or the sum was edited"
        )
    claimed = header.get("divisor")
    if weight <= 0 or weight != claimed:
        raise BadAggregate(
            f"decrypted total weight {weight} differs from the claimed {claimed!r}: a client "
            "encrypted another weight than it declared"
        )
    mean = slots[:n].astype(np.float64) / (ctx.params.scale * weight)
    peak = float(np.max(np.abs(mean))) if n else 0.0
    if not np.isfinite(peak) or peak > ctx.params.max_abs_value:
        raise BadAggregate(
            f"a value of the decrypted mean has magnitude {peak:.4g} > secagg.max_abs_value="
            f"{ctx.params.max_abs_value}: the encrypted sum overflowed the plaintext modulus "
            "(a client encrypted a value out of range)"
        )
    return weight


def decrypt_model(
    ctx: HEContext,
    payload: list[np.ndarray],
    shapes: list[tuple[int, ...]],
    *,
    allow_noise: bool = False,
) -> list[np.ndarray]:
    """Decrypt and check an aggregate payload into float64 arrays of `shapes`: sum / the
    decrypted weight. BadAggregate when `check_aggregate` fails or the payload is malformed;
    a plain HEError for a configuration mismatch (other keys, another model layout)."""
    try:
        header, ciphertexts = unpack_payload(payload)
        int(header["num_values"]), int(header["round"])
    except (HEError, KeyError, TypeError, ValueError) as err:
        raise BadAggregate(f"malformed aggregate ({err})") from err
    if header.get("context") != ctx.fingerprint:
        raise HEError(
            "the model was encrypted under other keys than this node's secret context: "
            "give the SuperNode the secret context provisioned for this run "
            f"(payload key fingerprint {header.get('context')}, this node {ctx.fingerprint})"
        )
    if header.get("kind") != "aggregate":
        raise HEError(f"expected an aggregate payload, got kind={header.get('kind')!r}")
    if header.get("layout") != layout_hash(shapes):
        raise HEError("the encrypted model's tensor layout differs from this node's model")
    n = int(header["num_values"])
    expected = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
    if n != expected:
        raise BadAggregate(f"aggregate says {n} values, this node's model has {expected}")
    if len(ciphertexts) != num_ciphertexts(n, ctx.slots):
        raise BadAggregate(f"aggregate has {len(ciphertexts)} ciphertexts, {num_ciphertexts(n, ctx.slots)} expected")
    decryptor, encoder = ctx.decryptor, ctx.encoder
    values = []
    for data in ciphertexts:
        plain = seal.Plaintext()
        try:
            decryptor.decrypt(load_ciphertext(ctx, data), plain)
        except HEError as err:
            raise BadAggregate(str(err)) from err
        values.append(np.asarray(encoder.decode_int64(plain), dtype=np.int64))
    slots = np.concatenate(values)
    weight = check_aggregate(ctx, header, slots, allow_noise=allow_noise)
    flat = slots[:n].astype(np.float64) / (ctx.params.scale * weight)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[start : start + size].reshape(shape))
        start += size
    if start != flat.size:
        raise HEError(f"payload holds {flat.size} values, the model has {start}")
    return out
