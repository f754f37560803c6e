"""INT4 storage of the ``qcompiler`` dialect: two signed 4-bit codes per byte, low nibble first."""

from __future__ import annotations

import numpy as np


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Two signed 4-bit codes per byte along the last axis, low nibble first: ``[..., 2k] -> [..., k]`` uint8.

    Raises:
        ValueError: a code outside [-8, 7] or an odd last axis.
    """
    q = np.asarray(codes)
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last axis must be even, got {q.shape[-1]}; pad it with a zero code")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    nibbles = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``[..., k]`` uint8 -> ``[..., 2k]`` int8 in [-8, 7]."""
    p = np.asarray(packed, dtype=np.uint8)
    low = (p & 0xF).astype(np.int8)
    high = (p >> 4).astype(np.int8)
    out = np.empty((*p.shape[:-1], 2 * p.shape[-1]), dtype=np.int8)
    out[..., 0::2] = np.where(low > 7, low - 16, low)
    out[..., 1::2] = np.where(high > 7, high - 16, high)
    return out
