"""Dyadic numbers: a real rescale factor M written exactly once as ``b * 2^-c``.

The lowering pass turns every float scale ratio into a (multiplier, shift) pair with this module and
nowhere else, so the integer graph, the reference semantics and every backend agree by construction.

Rounding rule (the one rule of the dialect): ``round_shift(v, c) = (v + 2^(c-1)) >> c`` with an
arithmetic (flooring) shift, i.e. round half up, ties toward +infinity. It is exact in int64 arithmetic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MULTIPLIER_MIN = 1 << 30
MULTIPLIER_MAX = (1 << 31) - 1
SHIFT_MIN = 1
SHIFT_MAX = 62


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return ``(b, c)`` with ``b * 2^-c ~= real``, ``b`` in ``[2^30, 2^31)`` and ``c`` in ``[1, 62]``.

    ``real`` must be positive and below ``2^30`` (the shift must stay at least 1). Multipliers too small
    for a 62-bit shift keep ``c = 62`` and a smaller ``b`` (they round to zero on int32 inputs anyway).

    Raises:
        ValueError: ``real`` is not a finite positive number or is too large.
    """
    if not math.isfinite(real) or real <= 0.0:
        raise ValueError(f"rescale factor must be finite and > 0, got {real!r}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = round(mantissa * (1 << 31))
    if multiplier == 1 << 31:  # the mantissa rounded up to 1.0: renormalise instead of overflowing int32
        multiplier = 1 << 30
        exponent += 1
    shift = 31 - exponent
    if shift < SHIFT_MIN:
        raise ValueError(f"rescale factor {real!r} is too large for a dyadic multiplier (shift {shift} < 1)")
    if shift > SHIFT_MAX:
        multiplier = round(real * 2.0**SHIFT_MAX)
        shift = SHIFT_MAX
    return int(multiplier), int(shift)


def quantize_multipliers(reals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`quantize_multiplier`: int32 arrays of multipliers and shifts."""
    flat = np.asarray(reals, dtype=np.float64).reshape(-1)
    pairs = [quantize_multiplier(float(r)) for r in flat]
    mult = np.array([p[0] for p in pairs], dtype=np.int32).reshape(np.shape(reals))
    shift = np.array([p[1] for p in pairs], dtype=np.int32).reshape(np.shape(reals))
    return mult, shift


def quantize_multiplier_pair(real_a: Any, real_b: Any) -> tuple[Any, Any, int]:
    """Two factors sharing one shift: ``(b_a, b_b, c)`` with the largest multiplier in ``[2^30, 2^31)``.

    Each factor is a float (giving an int) or an array of per-channel factors (giving an int32 array).
    """
    arrays = [np.asarray(r, dtype=np.float64) for r in (real_a, real_b)]
    _, shift = quantize_multiplier(float(max(a.max() for a in arrays)))
    mults = [np.round(a * 2.0**shift) for a in arrays]
    if max(m.max() for m in mults) > MULTIPLIER_MAX:  # unreachable after frexp renormalisation; guards int32
        shift -= 1
        mults = [np.round(a * 2.0**shift) for a in arrays]
    out = [int(m) if np.ndim(r) == 0 else m.astype(np.int32) for m, r in zip(mults, (real_a, real_b), strict=True)]
    return out[0], out[1], int(shift)


def storage_dtype(lo: int, hi: int) -> np.dtype:
    """The integer type of an output clamped to ``[lo, hi]``: int8 when it fits, else int16.

    Every op with an output clamp (Requantize, RescaleAdd, QGemm, QConv, IntLayerNorm, IntGelu, IntSigmoid)
    stores its result in this type, so a wide (int16) tensor is declared by its clamp bounds alone.

    Raises:
        ValueError: the bounds are empty or do not fit int16.
    """
    if lo > hi:
        raise ValueError(f"output clamp [{lo}, {hi}] is empty")
    if lo >= -128 and hi <= 127:
        return np.dtype(np.int8)
    if lo >= -32768 and hi <= 32767:
        return np.dtype(np.int16)
    raise ValueError(f"output clamp [{lo}, {hi}] does not fit int16")


def round_shift(value: np.ndarray | np.integer, shift: np.ndarray | np.integer) -> np.ndarray:
    """``(value + 2^(shift-1)) >> shift`` in int64: the dialect's rounding rule (ties toward +inf)."""
    value = np.asarray(value, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    return (value + (np.int64(1) << (shift - 1))) >> shift


#: the largest row exponent: an int16 row read as int8 needs at most 9 (127 * 2^8 < 32767 <= 127 * 2^9); with
#: fewer levels (int4: 7) a row beyond ``qmax 2^9`` saturates at ``qmax``
ROW_EXPONENT_MAX = 9


def row_exponents(x: np.ndarray, qmax: int = 127, bound: int = 0) -> np.ndarray:
    """Per row of the last axis, the smallest ``e in [0, 9]`` with ``max |x| <= bound * 2^e`` (9 where none is;
    ``bound`` 0: ``qmax``; a larger one clips a row's peak into ``qmax`` rather than doubling its step): int8
    ``[..., 1]``."""
    peak = np.abs(np.asarray(x, dtype=np.int64)).max(axis=-1, keepdims=True)
    bounds = np.int64(bound or qmax) << np.arange(ROW_EXPONENT_MAX, dtype=np.int64)
    return (peak > bounds).sum(axis=-1, keepdims=True).astype(np.int8)


def row_shift(x: np.ndarray, exponents: np.ndarray, qmax: int = 127) -> np.ndarray:
    """``round_shift(x, e)`` per row (``e = 0``: x itself), clamped to ``[-qmax, qmax]``, int8 (the clamp acts only
    where :func:`row_exponents` reached its largest exponent: ``|x| <= qmax 2^e`` rounds to at most ``qmax``)."""
    x64 = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponents, dtype=np.int64)
    shifted = round_shift(x64, np.maximum(e, 1))
    return np.clip(np.where(e == 0, x64, shifted), -qmax, qmax).astype(np.int8)


#: the int32 accumulator budget an int4 GEMM's products may take (the rest is the bias's)
INT4_ACC_BUDGET = 1 << 30
#: largest symmetric int4 code and int8 activation magnitude
INT4_QMAX, INT8_ABS_MAX = 7, 128


def group_scale_bits(k: int, group_size: int | None) -> int:
    """Bits ``B`` of the integer group rescales of an int4 GEMM with reduction length ``k``: each group's
    scale is ``s_max * b / 2^B`` with ``b in [1, 2^B]``, and ``k * 128 * 7 * 2^B <= 2^30`` keeps the int32
    accumulator (and room for the bias) from overflowing. 8 up to K = 4681; 0 for one group (per channel).

    Raises:
        ValueError: ``k`` too long for even 2 bits of group-scale resolution.
    """
    if group_size is None or group_size >= k:
        return 0
    bits = min(8, int(np.floor(np.log2(INT4_ACC_BUDGET / (k * INT8_ABS_MAX * INT4_QMAX)))))
    if bits < 2:
        raise ValueError(f"group_scale_bits: K = {k} is too long for grouped int4 weights with int32 accumulation")
    return bits
