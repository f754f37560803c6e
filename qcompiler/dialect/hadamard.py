"""The integer Hadamard transform of the ``qcompiler`` domain: ``y = x @ (S_{2^m} (x) h)`` in int32.

``S_{2^m}`` is Sylvester's Hadamard matrix (``S[a, b] = (-1)^popcount(a & b)``) and ``h`` a small ``K x K``
+-1 block (Paley's constructions for K = 12, 20, 28, 36, ...; K = 1 for powers of two), so an order
``n = K 2^m`` costs ``n (K + m)`` adds instead of the ``n^2`` multiply-adds of a dense product: the block
product on each run of K channels, then m butterfly stages across the runs.

This module holds what the quantizer, the lowering and every backend share: the reference semantics, the
overflow bound and the recognition of a constant matrix as ``c (S (x) h)`` (so a float graph needs no marker:
any MatMul by a scaled Hadamard matrix of this structure becomes the fast op).
"""

from __future__ import annotations

import functools

import numpy as np

#: |y| <= n max|x|: an int16 input keeps the int32 sum exact up to this order
MAX_ORDER_INT16 = (1 << 31) // (1 << 15) - 1


@functools.lru_cache(maxsize=32)
def sylvester(m: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order ``2^m`` (int64, symmetric)."""
    index = np.arange(1 << m)
    bits = np.bitwise_and(index[:, None], index[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.int64)


def split_sylvester(signs: np.ndarray) -> np.ndarray | None:
    """The block ``h`` with ``signs == S_{2^m} (x) h`` for the largest such m, or None.

    Args:
        signs: a square +-1 integer matrix.
    """
    n = signs.shape[0]
    if signs.ndim != 2 or signs.shape[1] != n or n == 0:
        return None
    m = (n & -n).bit_length() - 1  # the power of two dividing n
    while m >= 0:
        k = n >> m
        block = signs[:k, :k]
        if np.array_equal(signs, np.kron(sylvester(m), block)):
            return np.ascontiguousarray(block).astype(np.int8)
        m -= 1
    return None


def hadamard_structure(weight: np.ndarray, rtol: float = 1e-5) -> tuple[float, np.ndarray] | None:
    """``(c, h)`` when ``weight == c (S_{2^m} (x) h)`` with ``h h^T = K I`` (so ``weight`` is c times a
    Hadamard matrix: orthogonal for ``c = 1/sqrt(n)``), else None.

    The check is exact on the signs and relative (``rtol``) on the magnitudes: float32 stores ``1/sqrt(n)``
    rounded.
    """
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] < 2:
        return None
    magnitude = np.abs(weight.astype(np.float64))
    c = float(magnitude.max())
    if c == 0.0 or not np.allclose(magnitude, c, rtol=rtol, atol=0.0):
        return None
    block = split_sylvester(np.sign(weight).astype(np.int64))
    if block is None:
        return None
    k = block.shape[0]
    wide = block.astype(np.int64)
    if not np.array_equal(wide @ wide.T, k * np.eye(k, dtype=np.int64)):
        return None
    return c, block


def hadamard_transform(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Reference semantics: ``x @ (S_{2^m} (x) h)`` over the last axis, exact in int64.

    Raises:
        ValueError: the last axis is not ``K 2^m`` for h of order K.
    """
    x64 = np.asarray(x, dtype=np.int64)
    block = np.asarray(h, dtype=np.int64)
    n, k = x64.shape[-1], block.shape[0]
    runs = n // k
    if block.shape != (k, k) or n % k or runs & (runs - 1):
        raise ValueError(f"Hadamard: the last axis ({n}) must be the block order ({k}) times a power of two")
    t = x64.reshape(*x64.shape[:-1], runs, k) @ block
    half = 1
    while half < runs:  # one butterfly stage per bit of the run index
        t = t.reshape(*x64.shape[:-1], runs // (2 * half), 2, half, k)
        low, high = t[..., 0, :, :], t[..., 1, :, :]
        t = np.stack([low + high, low - high], axis=-3)
        half *= 2
    return t.reshape(x64.shape)
