"""Client side of HE secure aggregation: decrypt the global model, encrypt a weighted update.

A client's contribution is its trained model's tensors, flattened in `state_dict` order,
multiplied by its aggregation weight (its example count under FedAvg, 1 under client-level DP),
scaled by 2^scale_bits, rounded to integers and packed N values per BFV ciphertext (the last
one zero-padded). After the values come three slots: the weight itself and two MAC tags
(protections/he/context.py, "the MAC"). The server adds the ciphertexts and returns the sum with the
claimed total weight in its header; a client decrypts, checks the aggregate (`check_aggregate`:
MAC, decrypted weight equals the claim, values finite and within max_abs_value) and divides by
the DECRYPTED weight. A failed check raises `BadAggregate`; the client reports it to the server
(a fit metric), which rolls back to the last good model.

`HomomorphicEncryption` is all of this as the client's pipeline step (protections/client_step.py):
decrypt the global model, leave the clipping step the rounding slack, answer the mask
protocol's exchanges (advertise keys, share, unmask: protections/he/masks.py), mask and
encrypt the result.
"""

from __future__ import annotations

import json
import math

import numpy as np
import tenseal.sealapi as seal
from flwr.common import Context, NDArrays, Scalar

from protections.he import masks
from protections.client_step import ClientStep, ClipSlack, RefuseRound, RoundContext
from protections.he.context import (
    BAD_AGGREGATE_METRIC,
    EXTRA_SLOTS,
    HE_ROUND_KEY,
    HE_SECRET_PATH_KEY,
    HE_WEIGHTING_KEY,
    NODE_SECRET_CONTEXT,
    TAG_SLOT,
    WEIGHT_SLOT,
    WEIGHT_TAG_SLOT,
    HEContext,
    HEError,
    centered,
    is_payload,
    layout_hash,
    linear_tag,
    load_ciphertext,
    load_context,
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
    `mask` (mod t): of num_values + 1 values (`protections.he.context.pairwise_mask` alone,
    the cohort's masks cancel), it is added to the values and the weight before the MAC tags
    are computed; of num_values + EXTRA_SLOTS (`protections.he.masks.masked_input`: double
    masking with dropout recovery), to every slot after the tags."""
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
    if mask is not None and mask.shape not in ((n + 1,), (n + EXTRA_SLOTS,)):
        raise HEError(f"mask of {mask.shape} values, expected {n + 1} or {n + EXTRA_SLOTS}")
    if mask is not None and mask.shape == (n + 1,):  # values and weight, before the tags
        padded[: n + 1] = _add_mod(padded[: n + 1], mask, t)
    padded[n + TAG_SLOT] = centered(linear_tag(keys, padded[: n + 1], t), t)
    padded[n + WEIGHT_TAG_SLOT] = centered(weight_key * int(padded[n + WEIGHT_SLOT]), t)
    if mask is not None and mask.shape == (n + EXTRA_SLOTS,):
        # Double masking (protections/he/masks.py): the tags are over the unmasked values and
        # masked too, so after the server subtracts the survivors' leftover masks the sum
        # carries the tags of the true sum (the MAC is linear) and no slot shows an update.
        padded[: n + EXTRA_SLOTS] = _add_mod(padded[: n + EXTRA_SLOTS], mask, t)
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


def _add_mod(values: np.ndarray, mask: np.ndarray, t: int) -> np.ndarray:
    """(values + mask) mod t in the BatchEncoder's signed range; values lie in (-t/2, t/2]."""
    # In int64 (t < 2^61: SEAL's plain modulus has at most 60 bits): values + mask lies in
    # (-t/2, 3t/2), so one subtraction of t where it exceeds t/2 brings it into (-t/2, t/2];
    # 1M values: 7 ms, where uint64 % t twice and np.where took 20 ms.
    out = values.astype(np.int64) + (mask.astype(np.uint64) % np.uint64(t)).view(np.int64)
    out -= (out > np.int64(t // 2)) * np.int64(t)
    return out


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


class HomomorphicEncryption(ClientStep):
    """The client half of HomomorphicAggregation (protections/he/server.py). Acts in a round
    only when the server sends `HE_ROUND_KEY`, and on every encrypted model it receives.

    `secret_context`: the node config's path to this node's secret context (deployment),
    else the server's `HE_SECRET_PATH_KEY` (simulation) is used. `expect_server_noise`
    (privacy=client_fixed): the server adds DP noise to the encrypted sum, so the aggregate's
    value MAC cannot hold. `uniform_weight` (any protected privacy mode): encrypt weight 1,
    the weight the DP release step reports, whatever the server's `HE_WEIGHTING_KEY` says.
    """

    def __init__(
        self, secret_context: str | None, *, expect_server_noise: bool, uniform_weight: bool
    ) -> None:
        self.secret_context = secret_context
        self.expect_server_noise = expect_server_noise
        self.uniform_weight = uniform_weight

    def receive(self, parameters: NDArrays, ctx: RoundContext) -> NDArrays:
        he = None
        if HE_ROUND_KEY in ctx.config or (not ctx.fitting and is_payload(parameters)):
            he = self._context(ctx.config)
        if ctx.fitting:
            ctx.carry[HE_ROUND_KEY] = he
        if is_payload(parameters):
            if he is None:
                raise HEError("received an encrypted model without secagg=he instructions")
            # float64, so the update this client encrypts is measured from the exact global model
            try:
                parameters = decrypt_model(
                    he, parameters, ctx.local_shapes(), allow_noise=self.expect_server_noise
                )
            except BadAggregate as err:
                if not ctx.fitting:
                    raise
                # The global model fails this key holder's check (tampered, overflowed, a
                # weight lie): train nothing, tell the server, which rolls back when most
                # clients agree.
                raise RefuseRound(str(err), {BAD_AGGREGATE_METRIC: str(err)}) from err
        if he is not None and ctx.fitting:
            # Clip to C minus what fixed-point rounding can add, so the encrypted update's
            # norm stays <= C (the server cannot check it under HE).
            num_values = sum(int(np.prod(shape)) for shape in ctx.local_shapes())
            ctx.clip_slack = ClipSlack(
                rounding_slack(num_values, he.params.scale),
                f"the fixed-point rounding slack of {num_values} encrypted values: raise "
                "secagg.scale_bits",
            )
        return parameters

    def transform(self, weights: NDArrays, ctx: RoundContext) -> NDArrays:
        he = ctx.carry.get(HE_ROUND_KEY)
        if he is None:
            return weights
        he_round = int(ctx.config[HE_ROUND_KEY])
        uniform = self.uniform_weight or ctx.config.get(HE_WEIGHTING_KEY) == "uniform"
        mask = self._mask(he, ctx, weights, he_round)
        return encrypt_update(he, weights, 1 if uniform else ctx.num_examples, he_round, mask=mask)

    def properties(self, config: dict[str, Scalar], node: Context | None) -> dict[str, Scalar]:
        """The mask protocol's exchanges outside fit (protections/he/masks.py): advertise this
        round's keys, share, unmask."""
        stage = config.get(masks.MASK_STAGE_KEY)
        if stage is None:
            return {}
        if node is None:
            raise HEError("pairwise masks need the client's Context (the round's keys live there)")
        server_round = int(config[masks.MASK_ROUND_KEY])
        if stage == "advertise":
            return dict(masks.advertise(node.state, server_round))
        if stage == "share":
            peers = json.loads(str(config[masks.PEERS_KEY]))
            return dict(masks.share(node.state, server_round, peers, int(config[masks.THRESHOLD_KEY])))
        if stage == "unmask":
            survivors = json.loads(str(config[masks.SURVIVORS_KEY]))
            return dict(masks.unmask(node.state, server_round, survivors))
        raise HEError(f"unknown mask stage {stage!r}")

    def _context(self, config: dict[str, Scalar]) -> HEContext:
        """This node's secret context: its node config path (deployment), else the path the
        simulation run provisioned its keys at."""
        path = self.secret_context or config.get(HE_SECRET_PATH_KEY)
        if not path:
            raise HEError(
                "secagg=he needs this node's secret context: start the SuperNode with "
                f"--node-config '{NODE_SECRET_CONTEXT}=/path/to/secret.ctx ...'"
            )
        he = load_context(str(path))
        if not he.is_secret:
            raise HEError(f"{path} is a public context: SuperNodes need the secret one")
        return he

    def _mask(self, he: HEContext, ctx: RoundContext, weights: NDArrays, he_round: int):
        """This node's double mask for the cohort the server named (protections/he/masks.py),
        or None when the server asks for none (secagg.pairwise_masks=false)."""
        if masks.PEERS_KEY not in ctx.config:
            return None
        if ctx.node is None:
            raise HEError("pairwise masks need the client's Context (the round's keys live there)")
        layout = layout_hash([np.shape(a) for a in weights])
        num_values = sum(int(np.size(a)) for a in weights)
        return masks.masked_input(he, ctx.node.state, ctx.config, he_round, layout, num_values)
