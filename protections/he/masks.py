"""Pairwise masks with dropout recovery: SecAgg's double masking inside the BFV plaintexts.

Why masks at all: every key holder has the same secret key, so one key holder colluding with
the server could decrypt any client's ciphertext. Each client therefore adds, inside its BFV
plaintext (every slot it fills: values, weight, the two MAC tags), a vector uniform mod t:

    y_i = x_i + PRG(b_i) + sum_{j in cohort, j != i} +-PRG(s_ij)   (mod t)

`s_ij` comes from an X25519 agreement of the two clients' fresh per-round mask keys (HKDF,
protections/he/context.py `pairwise_mask`); i adds it when its public key sorts first, j
subtracts it, so the pairwise masks cancel in the sum of the whole cohort. `b_i` is a fresh
32-byte self-mask seed. A colluding key holder decrypting y_i alone sees uniform noise.

Dropout recovery (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017; Flower's SecAgg+ runs the same protocol on plaintext vectors):
before it masks, each client t-of-n Shamir-shares both its self-mask seed b_i and its mask
private key s_i to the cohort (Flower's `create_shares`/`combine_shares`), each peer's shares
encrypted with ChaCha20-Poly1305 under a key from a second X25519 agreement, so the server,
which routes them, cannot read them. After the masked ciphertexts arrive the server asks the
survivors, for every cohort member, for ONE kind of share: the b-share of a survivor (its self
mask must be removed) or the s-share of a dropped member (its pairwise masks with the
survivors did not cancel). It reconstructs, computes the survivors' leftover masks and
subtracts them from the encrypted sum as a plaintext (ct - pt mod t). Every honest client
refuses to reveal both kinds for the same peer in a round (`unmask`), which is what protects
a survivor: unmasking one client's ciphertext needs its b_i AND its s_i.

The message flow, on Flower's legacy Strategy/ClientProxy API (protections/he/server.py):

1. advertise (`configure_fit`, `get_properties`): each sampled node makes two fresh X25519
   key pairs for this round (share encryption c, masking s) and returns the public halves;
2. share (`configure_fit`, `get_properties`): the server names the cohort (all keys, in one
   order) and the threshold; each node draws b_i, shares b_i and s_i, returns one sealed
   message per peer and a commitment SHA-256(b_i);
3. masked input (`fit`): each node's instructions carry the members that shared (U2) and the
   sealed shares addressed to it; it opens and keeps them, masks with U2 and encrypts;
4. unmask (`aggregate_fit`, `get_properties`): the server names the survivors U3 (the nodes
   whose ciphertexts it summed); each survivor returns its b-shares of U3 and its s-shares of
   U2 minus U3. With fewer than the threshold of survivors or answers, nothing can be
   reconstructed: the round is recorded as failed and the model is kept.

Clients check at each step what they can: the cohort holds their keys once and no key twice,
n/2 < threshold <= n (a server asking for a lower threshold could collect both kinds of
shares from disjoint halves of the cohort), U3 within U2 and at least the threshold, one share
request and one masked input per round, and the refuse-both rule across any number of unmask
requests.

What an actively malicious server can still do: keys are not authenticated (no PKI: SecAgg+
signs them with long-term keys; nothing here does), so it can name keys it generated itself
as a client's whole cohort and later "reconstruct" its own peers: that client's update is then
exposed. It can claim a survivor dropped: it then obtains that client's s_i but never its b_i
from the same honest client, and b_i from at most the survivors it lied to; with a threshold
above n/2 it cannot collect t of each kind from honest clients. It can report different
survivor sets to different clients (SecAgg's consistency round, which signs U3, is not
implemented). It can subtract a wrong correction: the key holders' MAC (context.py) catches
any change to the sum's plaintext and the round rolls back. A client sending wrong shares is
caught when the reconstruction fails its check (the s public key or the b commitment): the
round fails, recorded.

Cost: one extra `get_properties` round trip before fit (share) and one after (unmask), each a
few hundred bytes per peer, plus the PRG expansions (measured in README.md's HE section).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets

import numpy as np
from flwr.common import ConfigRecord, RecordDict

from protections.he.context import EXTRA_SLOTS, PAYLOAD_ALGORITHM, HEContext, HEError, _hkdf, _uniform_mod, add_mod_t, mask_keypair, pairwise_mask

# get_properties config keys and answers of the mask protocol (server -> node -> server).
MASK_STAGE_KEY = "he_mask"  # "advertise" | "share" | "unmask"
MASK_ROUND_KEY = "he_mask_round"
MASK_PK_PROPERTY = "he_mask_pk"  # the node's masking public key s (hex)
SHARE_PK_PROPERTY = "he_share_pk"  # the node's share-encryption public key c (hex)
PEERS_KEY = "he_mask_peers"  # JSON [[c hex, s hex], ...]: the cohort, in index order
THRESHOLD_KEY = "he_mask_threshold"
SHARES_PROPERTY = "he_mask_shares"  # share answer: JSON list, one sealed message per peer
COMMIT_PROPERTY = "he_mask_commit"  # share answer: SHA-256 of b_i (hex)
MEMBERS_KEY = "he_mask_members"  # fit config: JSON list of the indices that shared (U2)
INBOX_KEY = "he_mask_inbox"  # fit config: JSON {sender index: sealed message to this node}
SURVIVORS_KEY = "he_mask_survivors"  # unmask config: JSON list of indices summed (U3)
B_SHARES_PROPERTY = "he_mask_b_shares"  # unmask answer: JSON {index: share hex}
S_SHARES_PROPERTY = "he_mask_s_shares"
STATE = "he_mask_round_state"  # the node's round state, in its Flower context state


def threshold_for(cohort: int, configured: int = 0) -> int:
    """The Shamir threshold for a cohort of n: `configured`, else ceil(2n/3) (SecAgg+'s
    default share of the cohort), and never at or below n/2 (see the module docstring)."""
    return max(int(configured) or math.ceil(2 * cohort / 3), cohort // 2 + 1)


def _digest(peers: list) -> str:
    return hashlib.sha256(json.dumps(peers).encode()).hexdigest()


def _x25519_private(hex_key: str):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hex_key))


def _public_of(private) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key (b"" when it is not 32 bytes)."""
    return _public_of(_x25519_private(private.hex())) if len(private) == 32 else b""


def _box(c_private, peer_c: bytes, server_round: int, sender: int, receiver: int):
    """ChaCha20-Poly1305 for the shares `sender` sends `receiver`: the key is HKDF of the two
    share keys' X25519 agreement with the direction, so each key seals one message (a zero
    nonce is then safe); the associated data binds round and direction."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    shared = c_private.exchange(X25519PublicKey.from_public_bytes(peer_c))
    info = f"shares|{PAYLOAD_ALGORITHM}|{server_round}|{sender}->{receiver}".encode()
    return ChaCha20Poly1305(_hkdf(shared, info)), info


def self_mask(ctx: HEContext, seed: bytes, server_round: int, layout: str, count: int) -> np.ndarray:
    """PRG(b_i): `count` values uniform mod t, from the self-mask seed."""
    info = f"self-mask|{PAYLOAD_ALGORITHM}|{int(server_round)}|{layout}|{int(count)}".encode()
    return _uniform_mod(_hkdf(seed, info), count, ctx.plain_modulus)


def mask_count(num_values: int) -> int:
    """Slots a masked payload masks: the values, the weight and both MAC tags."""
    return num_values + EXTRA_SLOTS


# --------------------------------------------------------------------------- node side
def _state(node: RecordDict, server_round: int, stage: str) -> dict:
    record = node.get(STATE)
    raw = json.loads(str(record["json"])) if record is not None else {}
    if raw.get("round") != server_round:
        raise HEError(f"mask {stage} for round {server_round} without this node's keys of that round")
    return raw


def _save(node: RecordDict, state: dict) -> None:
    node[STATE] = ConfigRecord({"json": json.dumps(state)})


def advertise(node: RecordDict, server_round: int) -> dict[str, str]:
    """Step 1: fresh share and mask key pairs for this round (the mask key is shared, so a
    dropped round's reconstruction must not expose any other round)."""
    c_private, c_public = mask_keypair()
    s_private, s_public = mask_keypair()
    _save(node, {"round": server_round, "c": c_private.private_bytes_raw().hex(), "s": s_private.private_bytes_raw().hex()})
    return {SHARE_PK_PROPERTY: c_public.hex(), MASK_PK_PROPERTY: s_public.hex()}


def share(node: RecordDict, server_round: int, peers: list[list[str]], threshold: int) -> dict[str, str]:
    """Step 2: draw b_i, t-of-n share b_i and s_i, seal each peer's pair of shares."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    state = _state(node, server_round, "share")
    if "me" in state:
        raise HEError(f"a second share request for round {server_round}: refused (one sharing per round)")
    c_private, s_private = _x25519_private(state["c"]), _x25519_private(state["s"])
    own = [_public_of(c_private).hex(), _public_of(s_private).hex()]
    n = len(peers)
    keys = [tuple(p) for p in peers] if all(isinstance(p, list) and len(p) == 2 for p in peers) else []
    if len(keys) != n or peers.count(own) != 1 or len(set(keys)) != n or len({k for p in keys for k in p}) != 2 * n:
        raise HEError("the server's mask cohort omits this node, repeats a key or is malformed: refusing to share")
    if n < 2 or not n // 2 < int(threshold) <= n:
        raise HEError(f"mask threshold {threshold} for a cohort of {n}: it must be in ({n / 2:g}, {n}] and n >= 2")
    me, t = peers.index(own), int(threshold)
    b = secrets.token_bytes(32)
    b_shares = create_shares(b, t, n)
    s_shares = create_shares(s_private.private_bytes_raw(), t, n)
    sealed = []
    for j, (c_peer, _) in enumerate(peers):
        if j == me:
            sealed.append("")
            continue
        box, info = _box(c_private, bytes.fromhex(c_peer), server_round, me, j)
        message = json.dumps({"b": b_shares[j].hex(), "s": s_shares[j].hex()}).encode()
        sealed.append(box.encrypt(bytes(12), message, info).hex())
    state.update(me=me, t=t, peers=peers, digest=_digest(peers), b=b.hex(),
                 kept={str(me): {"b": b_shares[me].hex(), "s": s_shares[me].hex()}})  # fmt: skip
    _save(node, state)
    return {SHARES_PROPERTY: json.dumps(sealed), COMMIT_PROPERTY: hashlib.sha256(b).hexdigest()}


def masked_input(
    ctx: HEContext, node: RecordDict, config: dict, server_round: int, layout: str, num_values: int
) -> np.ndarray:
    """Step 3: open the shares addressed to this node, keep them, and return this node's
    mask (mod t, `mask_count(num_values)` slots): PRG(b_i) plus its pairwise masks with U2."""
    state = _state(node, server_round, "input")
    if "me" not in state or state.get("masked"):
        raise HEError(f"round {server_round}: masked input without a sharing, or a second one: refused")
    peers = json.loads(str(config[PEERS_KEY]))
    if _digest(peers) != state["digest"]:
        raise HEError("the fit instructions name another mask cohort than this node shared with")
    members = [int(i) for i in json.loads(str(config[MEMBERS_KEY]))]
    inbox = {int(k): v for k, v in json.loads(str(config[INBOX_KEY])).items()}
    me, t, n = state["me"], state["t"], len(peers)
    if me not in members or len(set(members)) != len(members) or not all(0 <= i < n for i in members) or len(members) < t:
        raise HEError(f"mask members {members} omit this node, repeat one or are fewer than the threshold {t}")
    c_private = _x25519_private(state["c"])
    for j in members:
        if j == me:
            continue
        if j not in inbox:
            raise HEError(f"the shares of member {j} are missing from this node's instructions")
        box, info = _box(c_private, bytes.fromhex(peers[j][0]), server_round, j, me)
        try:
            state["kept"][str(j)] = json.loads(box.decrypt(bytes(12), bytes.fromhex(str(inbox[j])), info))
        except Exception as err:  # noqa: BLE001 - InvalidTag, bad hex or JSON: altered in transit
            raise HEError(f"the shares of member {j} do not open (altered or misaddressed): {type(err).__name__}") from err
    state.update(members=members, masked=True, revealed={})
    _save(node, state)
    return node_mask(ctx, node, server_round, layout, num_values)


def node_mask(ctx: HEContext, node: RecordDict, server_round: int, layout: str, num_values: int) -> np.ndarray:
    """The mask this node applies in `server_round` once it holds its members: PRG(b_i) plus
    its pairwise masks with them, mod t, over `mask_count(num_values)` slots."""
    state = _state(node, server_round, "mask")
    count, peers = mask_count(num_values), state["peers"]
    s_private = _x25519_private(state["s"])
    mine = _public_of(s_private)
    members = [bytes.fromhex(peers[j][1]) for j in state["members"]]
    mask = pairwise_mask(ctx, s_private, mine, members, server_round, layout, count)
    return add_mod_t(mask, self_mask(ctx, bytes.fromhex(state["b"]), server_round, layout, count), ctx.plain_modulus)


def unmask(node: RecordDict, server_round: int, survivors: list[int]) -> dict[str, str]:
    """Step 4: b-shares of the survivors, s-shares of the members that dropped; never both
    kinds for one peer in a round, whatever the server asks across requests."""
    state = _state(node, server_round, "unmask")
    if not state.get("masked"):
        raise HEError(f"round {server_round}: unmask request before this node's masked input")
    members, t, me = state["members"], state["t"], state["me"]
    survivors = [int(i) for i in survivors]
    if me not in survivors or not set(survivors) <= set(members) or len(set(survivors)) < t:
        raise HEError(
            f"unmask request names survivors {survivors}: they must include this node, lie within "
            f"the members {members} and number at least the threshold {t}"
        )
    revealed = state["revealed"]
    wanted = {str(j): ("b" if j in survivors else "s") for j in members}
    both = sorted(int(j) for j, kind in wanted.items() if revealed.get(j, kind) != kind)
    if both:
        raise HEError(
            f"refusing to reveal both shares of peers {both} in round {server_round}: the other "
            "kind was already revealed for each (together they would unmask its update)"
        )
    revealed.update(wanted)
    _save(node, state)
    kept = state["kept"]
    return {
        B_SHARES_PROPERTY: json.dumps({j: kept[j]["b"] for j, k in wanted.items() if k == "b"}),
        S_SHARES_PROPERTY: json.dumps({j: kept[j]["s"] for j, k in wanted.items() if k == "s"}),
    }


# --------------------------------------------------------------------------- server side
def reconstruct(shares: list[bytes], threshold: int) -> bytes:
    """The secret from `threshold` Shamir shares (Flower's combine_shares); HEError if fewer
    or if they do not combine."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    if len(shares) < threshold:
        raise HEError(f"{len(shares)} shares, the threshold is {threshold}")
    try:
        return combine_shares(shares[:threshold])
    except Exception as err:  # noqa: BLE001 - bad shares from a node
        raise HEError(f"shares do not combine ({err})") from err


def correction(
    ctx: HEContext, server_round: int, layout: str, num_values: int,
    b_seeds: list[bytes], dropped: list[tuple[bytes, bytes]], survivor_pks: list[bytes],
) -> np.ndarray:  # fmt: skip
    """What the survivors' masks leave in the sum (mod t): their self masks, plus for each
    dropped member j (its private key, its public key) its pairwise masks with the survivors,
    which the survivors added with the opposite sign of j's own `pairwise_mask`."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    count, t = mask_count(num_values), ctx.plain_modulus
    total = np.zeros(count, dtype=np.uint64)
    for seed in b_seeds:
        add_mod_t(total, self_mask(ctx, seed, server_round, layout, count), t)
    for private, public in dropped:
        theirs = pairwise_mask(ctx, X25519PrivateKey.from_private_bytes(private), public, survivor_pks, server_round, layout, count)
        add_mod_t(total, np.uint64(t) - theirs, t)
    return total
