"""Compressed client updates (`compression=fp16|int8`): the wire format both sides share.

A client sends its update u = trained - global instead of its model, quantized:
- `int8`: per tensor, scale s = max|u| / 127 and q = SR(u / s) in int8, where SR is
  stochastic rounding (floor, plus 1 with probability the fractional part): unbiased,
  E[q * s] = u, and |q * s - u| < s for every value. The message holds the int8 tensors (same
  shapes) followed by one float32 array of the scales: 1 byte per value instead of 4.
- `fp16`: u stochastically rounded to one of its two neighbouring float16 values (unbiased;
  error below one float16 spacing at |u|: <= max(|u| 2^-10, 2^-24)); no scale needed, since
  updates are far inside float16's range (a value beyond 65504 is an error). 2 bytes per value.

Why unbiased rounding: FedAvg averages many updates, so independent rounding errors average
out instead of adding a systematic drift as round-to-nearest's bias would for small updates.

The server dequantizes (protections/compression/server.py) against the global model it sent this
round, before validation, DP clipping and aggregation, so every layer below sees float32
models. Written by hand with NumPy: torch.ao's quantizers round to nearest (no stochastic
rounding) and Flower ships no update compression.
"""

from __future__ import annotations

import numpy as np

COMPRESSION_KEY = "compression"  # fit-config key: the scheme the server asks clients to use
SCHEMES = ("fp16", "int8")
INT8_MAX = 127
FP16_MAX = float(np.finfo(np.float16).max)


class CompressionError(ValueError):
    """A compressed update that does not match what the server sent."""


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = np.floor(x)
    return low + (rng.random(x.shape) < (x - low))


def quantize_int8(u: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    u = np.asarray(u, dtype=np.float64)
    peak = float(np.max(np.abs(u))) if u.size else 0.0
    scale = np.float32(peak / INT8_MAX) if peak > 0 else np.float32(1.0)
    q = stochastic_round(u / float(scale), rng)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def to_fp16_stochastic(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = np.asarray(u, dtype=np.float32)
    if u.size and float(np.max(np.abs(u))) > FP16_MAX:
        raise CompressionError(f"an update value beyond float16's range ({FP16_MAX}): use int8")
    near = u.astype(np.float16)
    above = near.astype(np.float32) > u
    low = np.where(above, np.nextafter(near, np.float16(-np.inf)), near)
    high = np.where(above, near, np.nextafter(near, np.float16(np.inf)))
    gap = high.astype(np.float32) - low.astype(np.float32)
    p_high = np.divide(u - low.astype(np.float32), gap, out=np.zeros_like(u), where=gap > 0)
    return np.where(rng.random(u.shape) < p_high, high, low).astype(np.float16)


def compress_update(
    sent: list[np.ndarray], trained: list[np.ndarray], scheme: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """The arrays a client returns for `trained` under `scheme` (see the module docstring)."""
    update = [np.asarray(t, dtype=np.float32) - np.asarray(s, dtype=np.float32) for s, t in zip(sent, trained)]
    if scheme == "fp16":
        return [to_fp16_stochastic(u, rng) for u in update]
    if scheme == "int8":
        pairs = [quantize_int8(u, rng) for u in update]
        return [q for q, _ in pairs] + [np.array([s for _, s in pairs], dtype=np.float32)]
    raise CompressionError(f"compression={scheme!r}: use one of {', '.join(SCHEMES)}")


def decompress_update(
    sent: list[np.ndarray], arrays: list[np.ndarray], scheme: str
) -> list[np.ndarray]:
    """The client's model (global + dequantized update, in the global model's dtypes); a
    CompressionError names what does not match."""
    n = len(sent)
    if scheme == "int8":
        if len(arrays) != n + 1:
            raise CompressionError(f"{len(arrays)} arrays, expected {n} int8 tensors + 1 scales array")
        tensors, scales = arrays[:n], arrays[n]
        if scales.dtype != np.float32 or scales.shape != (n,) or not np.all(np.isfinite(scales)):
            raise CompressionError(f"scales array is {scales.dtype}{scales.shape}, expected finite float32({n},)")
        want = np.int8
    elif scheme == "fp16":
        if len(arrays) != n:
            raise CompressionError(f"{len(arrays)} arrays, expected {n} float16 tensors")
        tensors, scales, want = arrays, np.ones(n, dtype=np.float32), np.float16
    else:
        raise CompressionError(f"compression={scheme!r}: use one of {', '.join(SCHEMES)}")
    out = []
    for i, (s, t) in enumerate(zip(sent, tensors)):
        if t.dtype != want or t.shape != s.shape:
            raise CompressionError(
                f"tensor {i} is {t.dtype}{t.shape}, expected {np.dtype(want)}{s.shape}"
            )
        out.append((s.astype(np.float32) + t.astype(np.float32) * scales[i]).astype(s.dtype))
    return out
