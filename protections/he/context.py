"""Homomorphic secure aggregation: the keys, and the payload format both sides share.

Why BFV batching through `tenseal.sealapi` and not TenSEAL's high-level CKKS vectors
----------------------------------------------------------------------------------
Secure aggregation only *adds* ciphertexts. That is all the server ever does here:

- Clients pre-weight (NVFlare's approach) and the division by the total weight happens after
  decryption, on the clients. So no ciphertext is ever multiplied, nothing is rescaled, and the
  coefficient modulus needs a single prime (56 bits) instead of CKKS' chain of primes.
- BFV's batch encoder packs N values into one ciphertext (CKKS' encoder packs N/2).
- Clients quantize their pre-weighted values to integers with a fixed-point scale 2^scale_bits;
  BFV decryption is then *exact* (it rounds the encryption noise away), so the only error is the
  clients' rounding, at most 0.5/2^scale_bits on the weighted mean (7.6e-6 at the default 16).
  CKKS with a single small prime cannot do that: its scale and its noise share the same bits
  (measured on this project's benchmark machine: a 2^20 scale drowns in noise).
- Clients hold the secret key (the HE setting of NVFlare and of TenSEAL's tutorials), so they
  encrypt *symmetrically*, and SEAL serializes a symmetric ciphertext with the random half
  replaced by its PRNG seed: half the bytes. TenSEAL's high-level serialization always writes
  both halves; `sealapi.Encryptor.encrypt_symmetric(plain)` returns SEAL's seeded form.
- No public, relinearization or Galois keys are needed (addition uses none), so the server's
  context is the encryption parameters alone: it holds no key material at all.

Measured (N=4096, q=56 bits, t=40 bits, 1M parameters, one core): 7.6 bytes per parameter
client -> server (seeded), 15.1 server -> clients (a sum of ciphertexts has no seed), against
4 for float32 and 83 for TenSEAL's tutorial CKKS; encrypting 1M values takes 0.17 s.

Security: SEAL validates the parameters against the HomomorphicEncryption.org standard for
128-bit classical security (`sec_level=TC128`); N=4096 allows up to 109 bits of modulus, and 56
are used. Noise: a fresh ciphertext has 11 bits of noise budget at these parameters; the errors
of independent ciphertexts add up like a random walk (measured: the sum of 2,048 ciphertexts
decrypts exactly with 5 bits left).

Range: the plaintext modulus t (a prime of `plain_modulus_bits` bits) must hold the sum of the
clients' pre-weighted quantized values: sum_i w_i * max|value| * 2^scale_bits < t / 2. Clients
refuse to encrypt a value above `max_abs_value`; the server rejects a client whose weight would
overflow the round's total (see `max_total_weight`) or exceeds `secagg.max_weight`, and key
holders check that the decrypted mean is within `max_abs_value` (a wrapped sum is not).

File and payload formats are ours (SEAL objects inside are SEAL's own serialization):
- context file: magic line, one JSON line (kind, key id, parameters, blob lengths), then the
  SEAL `EncryptionParameters` and, in the secret context only, the `SecretKey`;
- payload (what travels in Flower's `Parameters`, as two uint8 NumPy arrays so `NumPyClient`
  carries it unchanged): a JSON header with the tags the server checks (algorithm, context
  fingerprint, tensor layout, round, claimed weight or divisor, ciphertext lengths), and the
  concatenated serialized ciphertexts. Inside the plaintext, after the model's values: the
  weight and two MAC tags (v2, see "the MAC" below).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import secrets
import struct
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np


class _SealAPI:
    """`tenseal.sealapi`, imported on first use. Config validation imports this module on
    every party (the `secagg=he` schema's defaults are `HEParams`'), so a top-level TenSEAL
    import was paid by every ClientApp process (one per message in deployment) whether or
    not it encrypts; now only code that touches `seal.<name>` loads it."""

    def __getattr__(self, name: str):
        import tenseal.sealapi

        return getattr(tenseal.sealapi, name)


seal = _SealAPI()

ALGORITHM = "bfv-batch-seeded/v1"  # the context files' format (unchanged)
# The payload format: v2 adds three slots after the model values (weight, two MAC tags), see
# `encode_slots`. A v1 payload is refused (its divisor was a claim, not a decrypted value).
PAYLOAD_ALGORITHM = "bfv-batch-seeded-mac/v2"
WEIGHT_SLOT, TAG_SLOT, WEIGHT_TAG_SLOT = 0, 1, 2  # offsets after the num_values model values
EXTRA_SLOTS = 3
MAGIC = b"flower-private-finetune HE context v1\n"
SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"

# Fit/evaluate config keys the server sends and clients read.
HE_ROUND_KEY = "he_round"  # the round the client tags its encrypted update with
BAD_AGGREGATE_METRIC = "he_bad_aggregate"  # fit metric: why this key holder refused the model
HE_WEIGHTING_KEY = "he_weighting"  # "examples" (FedAvg) | "uniform" (client-level DP)
HE_SECRET_PATH_KEY = "he_secret_context"  # simulation only: where the run's keys were written
# Node config key (deployment): path of the SuperNode's secret context.
NODE_SECRET_CONTEXT = "he-secret-context"


class HEError(ValueError):
    """A bad HE configuration, key file or payload; the message says what and how to fix it."""


@dataclass(frozen=True)
class HEParams:
    """The encryption and encoding parameters (`secagg.*`), identical on every party."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (56,)
    plain_modulus_bits: int = 40
    scale_bits: int = 16
    max_abs_value: float = 8.0

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def seal_parameters(self) -> seal.EncryptionParameters:
        n = self.poly_modulus_degree
        if n < 1024 or n & (n - 1):
            raise HEError(f"secagg.poly_modulus_degree={n}: use a power of two >= 1024 (4096)")
        limit = seal.CoeffModulus.MaxBitCount(n, seal.SEC_LEVEL_TYPE.TC128)
        bits = list(self.coeff_mod_bit_sizes)
        if not bits or sum(bits) > limit:
            raise HEError(
                f"secagg.coeff_mod_bit_sizes={bits}: 128-bit security allows at most {limit} "
                f"bits in total for poly_modulus_degree={n}"
            )
        if not self.plain_modulus_bits + 8 <= min(bits) <= 60:
            raise HEError(
                f"secagg.coeff_mod_bit_sizes={bits} with plain_modulus_bits="
                f"{self.plain_modulus_bits}: each prime must have <= 60 bits and >= "
                "plain_modulus_bits + 8 (the noise budget that decryption needs)"
            )
        params = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        params.set_poly_modulus_degree(n)
        try:
            params.set_coeff_modulus(seal.CoeffModulus.Create(n, bits))
            params.set_plain_modulus(seal.PlainModulus.Batching(n, self.plain_modulus_bits))
        except (RuntimeError, ValueError) as err:
            raise HEError(f"SEAL rejects secagg parameters {asdict(self)}: {err}") from err
        return params

    def check_range(self) -> None:
        t_half = 2 ** (self.plain_modulus_bits - 1)
        if self.max_abs_value * self.scale >= t_half:
            raise HEError(
                f"secagg.max_abs_value={self.max_abs_value} at scale_bits={self.scale_bits} "
                f"does not fit plain_modulus_bits={self.plain_modulus_bits}: lower one of the "
                "first two or raise the third"
            )

    def max_total_weight(self, plain_modulus: int) -> int:
        """The largest sum of client weights whose aggregate cannot overflow t."""
        return int((plain_modulus // 2) // math.ceil(self.max_abs_value * self.scale))


@dataclass
class HEContext:
    """A loaded context. `secret_key` is None in the public (server) context."""

    params: HEParams
    key_id: str
    seal_context: seal.SEALContext
    parms_bytes: bytes
    secret_key: seal.SecretKey | None = None
    secret_bytes: bytes = b""  # the SecretKey's serialization as stored in secret.ctx
    _tools: dict = field(default_factory=dict, repr=False)

    @property
    def is_secret(self) -> bool:
        return self.secret_key is not None

    @property
    def slots(self) -> int:
        return self.params.poly_modulus_degree

    @property
    def plain_modulus(self) -> int:
        return self.seal_context.first_context_data().parms().plain_modulus().value()

    @property
    def fingerprint(self) -> str:
        """Identifies the key set: parameters and key id (not secret; tags every payload)."""
        return hashlib.sha256(self.parms_bytes + self.key_id.encode()).hexdigest()[:32]

    def _tool(self, name: str, make):
        if name not in self._tools:
            self._tools[name] = make()
        return self._tools[name]

    @property
    def encoder(self) -> seal.BatchEncoder:
        return self._tool("encoder", lambda: seal.BatchEncoder(self.seal_context))

    @property
    def evaluator(self) -> seal.Evaluator:
        return self._tool("evaluator", lambda: seal.Evaluator(self.seal_context))

    def _require_secret(self, what: str) -> seal.SecretKey:
        if self.secret_key is None:
            raise HEError(
                f"{what} needs the secret context, and this is the public (server) context: "
                "it holds no secret key. Only SuperNodes (key holders) can do this."
            )
        return self.secret_key

    @property
    def encryptor(self) -> seal.Encryptor:
        key = self._require_secret("Encryption")
        return self._tool("encryptor", lambda: seal.Encryptor(self.seal_context, key))

    @property
    def decryptor(self) -> seal.Decryptor:
        key = self._require_secret("Decryption")
        return self._tool("decryptor", lambda: seal.Decryptor(self.seal_context, key))

    @property
    def mac_master(self) -> bytes:
        """32 bytes from the secret key (HKDF-SHA256): the MAC key only key holders derive."""
        self._require_secret("The aggregate MAC")
        return self._tool("mac_master", lambda: _hkdf(self.secret_bytes, b"mac-master|" + self.key_id.encode()))

    def public(self) -> HEContext:
        """The same parameters and key id without the secret key."""
        return HEContext(self.params, self.key_id, self.seal_context, self.parms_bytes)


# --------------------------------------------------------------------------- SEAL <-> bytes
# TenSEAL's sealapi binds SEAL's save/load to file paths only, so objects pass through a file
# that lives only for the call (in memory under /dev/shm where there is one). No directory is
# kept: simulation workers are killed without running exit handlers.
_SCRATCH_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
_counter = itertools.count()


def _scratch_path() -> str:
    """A new empty file readable by its owner only (a secret key passes through it too)."""
    name = f"flower-he-{os.getpid()}-{threading.get_ident()}-{next(_counter)}-{secrets.token_hex(4)}"
    path = os.path.join(_SCRATCH_DIR, name)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def seal_to_bytes(obj) -> bytes:
    """Serialize a SEAL object (or a seeded `SerializableCiphertext`) with SEAL's own format."""
    path = _scratch_path()
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        Path(path).unlink(missing_ok=True)


def seal_from_bytes(obj, data: bytes, context: seal.SEALContext | None = None):
    """Load SEAL's serialization into `obj` (validated against `context` when given)."""
    path = _scratch_path()
    try:
        Path(path).write_bytes(data)
        if context is None:
            obj.load(path)
        else:
            obj.load(context, path)
        return obj
    finally:
        Path(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- contexts
def make_seal_context(params: HEParams) -> tuple[seal.SEALContext, bytes]:
    parms = params.seal_parameters()
    params.check_range()
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise HEError(f"SEAL rejects {asdict(params)}: {context.parameters_error_message()}")
    return context, seal_to_bytes(parms)


def new_context(params: HEParams) -> HEContext:
    """Fresh keys: a secret context (parameters + a new secret key + a random key id)."""
    context, parms_bytes = make_seal_context(params)
    secret_key = seal.KeyGenerator(context).secret_key()
    return HEContext(
        params, secrets.token_hex(16), context, parms_bytes, secret_key, seal_to_bytes(secret_key)
    )


def write_context(ctx: HEContext, path: Path) -> Path:
    """Write a context file; the secret one is created readable by its owner only."""
    secret = b""
    if ctx.secret_key is not None:
        secret = ctx.secret_bytes or seal_to_bytes(ctx.secret_key)
    header = {
        "kind": "secret" if secret else "public",
        "key_id": ctx.key_id,
        "algorithm": ALGORITHM,
        "params": {**asdict(ctx.params), "coeff_mod_bit_sizes": list(ctx.params.coeff_mod_bit_sizes)},
        "parms_len": len(ctx.parms_bytes),
        "secret_len": len(secret),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(MAGIC + json.dumps(header).encode() + b"\n" + ctx.parms_bytes + secret)
    return path


def provision(params: HEParams, out_dir: Path) -> tuple[Path, Path]:
    """Generate keys; write `secret.ctx` (for SuperNodes) and `public.ctx` (for the server)."""
    ctx = new_context(params)
    out_dir = Path(out_dir)
    return (
        write_context(ctx, out_dir / SECRET_FILE),
        write_context(ctx.public(), out_dir / PUBLIC_FILE),
    )


def load_context(path: str | Path) -> HEContext:
    path = Path(path).expanduser()
    stat = path.stat() if path.exists() else None
    if stat is None:
        raise HEError(
            f"HE context file {path} does not exist: provision keys with "
            "`python -m app.he_keys provision --out <dir>`"
        )
    return _load_context(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_context(path: str, mtime_ns: int, size: int) -> HEContext:
    # Cached per file version: a ClientApp is rebuilt for every message, the keys are not.
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise HEError(f"{path} is not an HE context file of this project")
    header_line, _, rest = data[len(MAGIC) :].partition(b"\n")
    try:
        header = json.loads(header_line)
        raw = header["params"]
        params = HEParams(**{**raw, "coeff_mod_bit_sizes": tuple(raw["coeff_mod_bit_sizes"])})
        parms_len, secret_len = int(header["parms_len"]), int(header["secret_len"])
    except (ValueError, KeyError, TypeError) as err:
        raise HEError(f"{path}: unreadable context header ({err})") from err
    if header.get("algorithm") != ALGORITHM or len(rest) != parms_len + secret_len:
        raise HEError(f"{path}: context of another algorithm or a truncated file")
    context, parms_bytes = make_seal_context(params)
    if parms_bytes != rest[:parms_len]:
        raise HEError(f"{path}: stored SEAL parameters do not match its header")
    ctx = HEContext(params, str(header["key_id"]), context, parms_bytes)
    if secret_len:
        ctx.secret_key = seal_from_bytes(seal.SecretKey(), rest[parms_len:], context)
        ctx.secret_bytes = rest[parms_len:]
    return ctx


# --------------------------------------------------------------------------- payloads
def layout_hash(shapes: list[tuple[int, ...]]) -> str:
    """Identifies the tensor layout (count, order, shapes) the flat vector came from."""
    return hashlib.sha256(json.dumps([list(s) for s in shapes]).encode()).hexdigest()[:16]


def num_ciphertexts(num_values: int, slots: int) -> int:
    """Ciphertexts of a payload of `num_values` model values (plus the EXTRA_SLOTS)."""
    return max(1, math.ceil((num_values + EXTRA_SLOTS) / slots))


def pack_payload(header: dict, ciphertexts: list[bytes]) -> list[np.ndarray]:
    """Header and ciphertexts as the two uint8 arrays that travel in Flower's Parameters."""
    header = {**header, "lengths": [len(c) for c in ciphertexts]}
    return [
        np.frombuffer(json.dumps(header).encode(), dtype=np.uint8).copy(),
        np.frombuffer(b"".join(ciphertexts), dtype=np.uint8).copy(),
    ]


def is_payload_header(array: np.ndarray) -> bool:
    """Whether `array` is the header of an HE payload (a payload's first array)."""
    return array.dtype == np.uint8 and array.ndim == 1 and array[:12].tobytes() == b'{"algorithm"'


def is_payload(arrays: list[np.ndarray]) -> bool:
    """Whether `arrays` is an HE payload (else: plaintext model tensors)."""
    return (
        len(arrays) == 2
        and arrays[1].dtype == np.uint8
        and arrays[1].ndim == 1
        and is_payload_header(arrays[0])
    )


def unpack_payload(arrays: list[np.ndarray]) -> tuple[dict, list[bytes]]:
    """Split a payload into its header and ciphertext bytes; HEError names what is wrong."""
    if len(arrays) != 2:
        raise HEError(f"payload has {len(arrays)} arrays, expected 2 (header, ciphertexts)")
    try:
        header = json.loads(arrays[0].tobytes())
        lengths = [int(n) for n in header["lengths"]]
    except (ValueError, KeyError, TypeError) as err:
        raise HEError(f"unreadable payload header ({err})") from err
    blob = arrays[1].tobytes()
    if any(n <= 0 for n in lengths) or sum(lengths) != len(blob):
        raise HEError(
            f"ciphertext bytes do not match the header: {len(blob)} bytes, header says "
            f"{sum(lengths)} (truncated or padded)"
        )
    offsets = np.cumsum([0] + lengths)
    return header, [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def payload_header(ctx: HEContext, kind: str, layout: str, num_values: int, server_round: int, **extra) -> dict:
    # "algorithm" first: is_payload() recognises a payload by it.
    return {
        "algorithm": PAYLOAD_ALGORITHM,
        "context": ctx.fingerprint,
        "kind": kind,  # "update" (client -> server) | "aggregate" (server -> clients)
        "layout": layout,
        "num_values": num_values,
        "round": server_round,
        "scale_bits": ctx.params.scale_bits,
        **extra,
    }


# SEAL's serialization header (seal/serialization.h): magic 0xA15E, header size 16, version
# major/minor, compression mode (0 none, 1 zlib, 2 zstd), 2 reserved bytes, total size.
_SEAL_HEADER = struct.Struct("<HBBBBHQ")
_SEAL_MAGIC = 0xA15E


def _ciphertext_byte_limit(ctx: HEContext) -> int:
    """Bytes of an uncompressed two-polynomial ciphertext at these parameters, plus headers;
    a payload larger than this is refused before SEAL decompresses anything."""
    n, levels = ctx.params.poly_modulus_degree, len(ctx.params.coeff_mod_bit_sizes)
    return 2 * n * levels * 8 + 512


def load_ciphertext(ctx: HEContext, data: bytes) -> seal.Ciphertext:
    """Deserialize and validate one ciphertext against `ctx`; anything else is an HEError.

    Checked against the installed SEAL 4.x (tests/test_he.py builds each case by hand):
    SEAL's `load(context, ...)` itself refuses a wrong scale, a correction factor other than 1,
    a size that does not match the buffer, and any coefficient >= its modulus. It does NOT
    check the NTT-form flag (a BFV ciphertext with it set loads, and `add` then raises "NTT
    form mismatch"), nor that the ciphertext is fresh (size 2) at the first level; nor does it
    bound the declared size before decompressing. Those are checked here."""
    if not isinstance(data, bytes | bytearray) or len(data) < _SEAL_HEADER.size:
        raise HEError("ciphertext shorter than SEAL's header")
    magic, hsize, major, _minor, compr, _reserved, total = _SEAL_HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or major != 4 or compr not in (0, 1, 2):
        raise HEError("not a SEAL 4 serialization (magic, header size, version or compression)")
    if total != len(data) or total > _ciphertext_byte_limit(ctx):
        raise HEError(f"ciphertext declares {total} bytes, has {len(data)} (limit {_ciphertext_byte_limit(ctx)})")
    try:
        ct = seal_from_bytes(seal.Ciphertext(), bytes(data), ctx.seal_context)
    except Exception as err:  # noqa: BLE001 - SEAL raises RuntimeError/ValueError/logic_error
        raise HEError(f"ciphertext does not load under this context ({err})") from err
    first = ctx.seal_context.first_context_data().parms()
    problems = [
        (ct.is_ntt_form(), "NTT form flag set (BFV ciphertexts are not in NTT form)"),
        (ct.size() != 2, f"size {ct.size()}, a fresh ciphertext has 2 polynomials"),
        (ct.parms_id() != ctx.seal_context.first_parms_id(), "parameter id of another level or context"),
        (ct.poly_modulus_degree() != first.poly_modulus_degree(), "poly_modulus_degree differs"),
        (ct.coeff_modulus_size() != len(first.coeff_modulus()), "coeff_modulus size differs"),
        (ct.scale != 1.0, f"scale {ct.scale} (BFV: 1)"),
        (ct.is_transparent(), "transparent (c1 = 0: the plaintext in the clear)"),
        (not seal.is_valid_for(ct, ctx.seal_context), "SEAL's validity check fails"),
    ]
    for bad, why in problems:
        if bad:
            raise HEError(f"ciphertext refused: {why}")
    return ct


def seed_id(ct: seal.Ciphertext) -> bytes:
    """Identifies the randomness of a loaded ciphertext: its c1 polynomial is SEAL's PRNG
    expansion of the seed that travelled in the seeded form, so equal leading c1 coefficients
    (32 of them, ~1,800 bits) mean the same seed. A fresh encryption draws a fresh seed, so a
    seen seed is a replay or a duplicate, whatever was edited in c0 or the header."""
    n = ct.poly_modulus_degree() * ct.coeff_modulus_size()
    return hashlib.sha256(struct.pack("<32Q", *(ct[n + i] for i in range(32)))).digest()[:16]


# --------------------------------------------------------------------------- the MAC
# A linear MAC over Z_t inside the plaintext. Each client appends to its values m_j (its
# pre-weighted quantized model, then its weight w) the tags T = sum_j k_j m_j mod t and
# T_w = k_w w mod t, with k = PRG(HKDF(secret key, round, layout)). Both are linear in m, so the
# decrypted SUM of honest payloads satisfies the same equations; a key holder checks them on the
# aggregate. The server holds no secret key, so it cannot compute k: any change it (or anyone
# without the key) makes to the sum's plaintext -- bit flips, a ciphertext under other keys,
# a replay from another round (other k), add_plain of a chosen delta -- passes with probability
# at most 2^-(b-1) per attempt (b = bits of t: 2^-39 at the defaults). No library offers a linear MAC over the plaintext
# modulus (HMAC cannot survive the homomorphic sum), hence this by hand; HKDF and the ChaCha20
# PRG are `cryptography`'s. A key holder can always forge (it has the key): that is item 4's
# bound check, not the MAC.
def _hkdf(key: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def mac_keys(ctx: HEContext, server_round: int, layout: str, num_values: int) -> tuple[np.ndarray, int]:
    """(k: num_values + 1 keys for values and weight, k_w) for this round: uniform in
    [0, 2^(b-1)) with b the bits of t, a subset of Z_t (so a forgery passes w.p. <= 2^-(b-1))."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    info = f"mac|{PAYLOAD_ALGORITHM}|{int(server_round)}|{layout}|{int(num_values)}".encode()
    stream = Cipher(algorithms.ChaCha20(_hkdf(ctx.mac_master, info), bytes(16)), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(8 * (num_values + 2))), dtype="<u8")
    keys = raw & np.uint64((1 << (ctx.plain_modulus.bit_length() - 1)) - 1)
    return keys[: num_values + 1], int(keys[num_values + 1])


def linear_tag(keys: np.ndarray, values: np.ndarray, t: int) -> int:
    """sum_j keys_j * values_j mod t, exact: keys and values (mod t, < 2^b) are split into
    halves of h = ceil(b/2) bits, so every partial product is < 2^(2h) and a block of them
    sums exactly (float64 BLAS-style row dots where 2h <= 44, else uint64 row sums); the block
    sums are combined exactly (`_exact_sum`). No per-element modular reduction: numpy's uint64
    % took 0.66 s at 1M values, the block loop of Python dots 0.03-0.05 s, this about 0.01 s."""
    b = int(t).bit_length()
    h = (b + 1) // 2
    float_path = 2 * h <= 44
    # float64: products < 2^(2h) are integers float64 holds, and so is every partial sum of a
    # block of 2^(52-2h) of them (< 2^52), whatever the order of the additions.
    # uint64: a block of 2^(62-2h) products < 2^(2h) sums below 2^62.
    block = 1 << min(12, (52 if float_path else 62) - 2 * h)  # 4096, or fewer where needed
    size = max(1, -(-keys.size // block)) * block
    m = np.zeros(size, dtype=np.int64)  # zero padding to whole blocks adds nothing
    m[: values.size] = values
    m -= (m >> np.int64(63)) * np.int64(t)  # values lie in (-t/2, t/2]: negatives + t
    m = m.view(np.uint64)
    k = np.zeros(size, dtype=np.uint64)
    k[: keys.size] = keys
    mask, sh = np.uint64((1 << h) - 1), np.uint64(h)
    # (through int64: numpy converts uint64 to float64 several times slower; halves are < 2^31)
    halves = (k & mask, k >> sh, m & mask, m >> sh)
    k0, k1, m0, m1 = (x.view(np.int64).astype(np.float64).reshape(-1, block) if float_path else x.reshape(-1, block) for x in halves)

    def dot(x: np.ndarray, y: np.ndarray) -> int:
        if float_path:
            sums = np.einsum("ij,ij->i", x, y).astype(np.int64)  # exact integers < 2^52
        else:
            sums = (x * y).sum(axis=1, dtype=np.uint64).astype(np.int64)  # each < 2^62
        return _exact_sum(sums)

    s11, s00 = dot(k1, m1), dot(k0, m0)
    s10 = dot(k1, m0) + dot(k0, m1)
    return ((s11 << (2 * h)) + (s10 << h) + s00) % t


def _exact_sum(values: np.ndarray) -> int:
    """The exact sum of non-negative int64 values (< 2^62) as a Python int: their low and high
    31 bits summed separately, so neither int64 sum can overflow below 2^32 values."""
    low = int((values & np.int64((1 << 31) - 1)).sum())
    high = int((values >> np.int64(31)).sum())
    return (high << 31) + low


def centered(x: int, t: int) -> int:
    """x mod t as the BatchEncoder's signed range (-t/2, t/2]."""
    x %= t
    return x - t if x > t // 2 else x


# --------------------------------------------------------------------------- pairwise masks
# Collusion resistance (issue 14); the round's protocol with dropout recovery (self masks,
# Shamir shares) is protections/he/masks.py, which uses these two.
# Each pair of clients (i, j) agrees on a seed by X25519 (`cryptography`) and HKDF, expands it
# with ChaCha20 into a vector uniform in Z_t, and i adds it while j subtracts it inside the
# BFV plaintext (values and weight slots), so the masks cancel in the sum and the MAC, being
# linear, still verifies. A key holder colluding with the server then decrypts one client's
# ciphertext to its update plus a uniform vector: independent of the update unless every
# other client of the cohort colludes too. Uniform sampling mod t is by hand (rejection from
# b-bit draws, exact), because no library draws a NumPy vector uniform mod an arbitrary prime.
def mask_keypair():
    """A new X25519 key pair for pairwise masks: (private key, raw 32-byte public key)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _uniform_mod(seed: bytes, count: int, t: int) -> np.ndarray:
    """`count` values exactly uniform in [0, t) from a ChaCha20 stream keyed by `seed`."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    bits = int(t).bit_length()
    mask = np.uint64((1 << bits) - 1)
    accept = t / float(1 << bits)  # >= 1/2 (t has as many bits as the mask); ~1 for t near 2^b
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        need = count - out.size
        # The expected draws plus 6 standard deviations: one pass almost always. The stream is
        # read in order, so the result does not depend on how it is cut into draws.
        words = int(need / accept + 6 * math.sqrt(need) + 64)
        draw = np.frombuffer(stream.update(bytes(8 * words)), dtype="<u8") & mask
        out = np.concatenate([out, draw[draw < np.uint64(t)]]) if out.size else draw[draw < np.uint64(t)]
    return out[:count]


def pairwise_mask(
    ctx: HEContext, private, public: bytes, peers: list[bytes], server_round: int, layout: str, count: int
) -> np.ndarray:
    """Sum over the cohort's other public keys of +-PRG(seed_ij), mod t, for `count` slots."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    t = ctx.plain_modulus
    total = np.zeros(count, dtype=np.uint64)
    for peer in peers:
        if peer == public:
            continue
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer))
        low, high = sorted((public, peer))
        info = f"mask|{PAYLOAD_ALGORITHM}|{int(server_round)}|{layout}|{int(count)}|".encode() + low + high
        vector = _uniform_mod(_hkdf(shared, info), count, t)
        add_mod_t(total, vector if public == low else np.uint64(t) - vector, t)
    return total


def add_mod_t(total: np.ndarray, other: np.ndarray, t: int) -> np.ndarray:
    """total = (total + other) mod t in place, for uint64 arrays with total in [0, t) and
    other in [0, t] (t < 2^61: the sum cannot wrap uint64, one subtraction reduces it).
    Several times faster than numpy's uint64 % at 1M values."""
    total += other
    total -= (total >= np.uint64(t)) * np.uint64(t)
    return total
