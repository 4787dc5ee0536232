"""Client side of HE secure aggregation: decrypt the global model, encrypt a weighted update.

A client's contribution is its trained model's tensors, flattened in `state_dict` order,
multiplied by its aggregation weight (its example count under FedAvg, 1 under client-level DP),
scaled by 2^scale_bits, rounded to integers and packed N values per BFV ciphertext (the last
one zero-padded). The server adds the ciphertexts and returns the sum with the total weight
(the divisor) in the clear; a client decrypts and divides. See app/he_context.py for why.
"""

from __future__ import annotations

import math

import numpy as np
import tenseal.sealapi as seal

from app.he_context import (
    HEContext,
    HEError,
    layout_hash,
    load_ciphertext,
    num_ciphertexts,
    pack_payload,
    payload_header,
    seal_to_bytes,
    unpack_payload,
)


def rounding_slack(num_values: int, params_scale: float) -> float:
    """Largest L2 norm the fixed-point rounding can add to a contribution: 0.5/scale per value.
    Client-level DP clips to C minus this, so the encrypted contribution stays within C."""
    return 0.5 * math.sqrt(num_values) / params_scale


def encrypt_update(
    ctx: HEContext, arrays: list[np.ndarray], weight: int, server_round: int
) -> list[np.ndarray]:
    """Encrypt `weight * arrays` (fixed point) into a tagged payload for the server."""
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
    slots = ctx.slots
    count = num_ciphertexts(flat.size, slots)
    padded = np.zeros(count * slots, dtype=np.int64)
    padded[: flat.size] = quantized
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
        layout_hash([np.shape(a) for a in arrays]),
        int(flat.size),
        server_round,
        weight=int(weight),
    )
    return pack_payload(header, ciphertexts)


def decrypt_model(
    ctx: HEContext, payload: list[np.ndarray], shapes: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Decrypt an aggregate payload into float64 arrays of `shapes` (sum / divisor)."""
    header, ciphertexts = unpack_payload(payload)
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
    divisor = float(header["divisor"])
    if not divisor > 0:
        raise HEError(f"aggregate divisor {divisor} must be > 0")
    decryptor, encoder = ctx.decryptor, ctx.encoder
    values = []
    for data in ciphertexts:
        plain = seal.Plaintext()
        decryptor.decrypt(load_ciphertext(ctx, data), plain)
        values.append(np.asarray(encoder.decode_int64(plain), dtype=np.int64))
    flat = np.concatenate(values)[: int(header["num_values"])]
    flat = flat.astype(np.float64) / (ctx.params.scale * divisor)
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[start : start + size].reshape(shape))
        start += size
    if start != flat.size:
        raise HEError(f"payload holds {flat.size} values, the model has {start}")
    return out
