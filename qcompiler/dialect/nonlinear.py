"""Reference semantics of the integer nonlinearities (I-BERT style): exact integer square root, softmax,
LayerNorm and RMSNorm. All arithmetic is int64; float appears only in :func:`softmax_constants` and
:func:`layernorm_constants`, which the lowering calls once to turn scales into integer attributes.

Bit widths (checked by the worst-case tests in tests/qcompiler/test_nonlinear.py):
- isqrt: any 0 <= n < 2^62; Newton from 2^ceil(bits(n)/2), stopping when the iterate stops decreasing.
- softmax: input int32 (int8 widened) at scale S with ``ln2_q = floor(ln2 / S)`` in [1, 2^14]: the polynomial
  ``(r + b_q)^2 + c_q`` stays below 2^31, an exponent below 2^30, a row sum of up to 2^33 entries fits int64.
- layernorm: int8 input along the last axis, C <= 2^15 channels: ``|d| = |C x - sum| <= 255 C``,
  ``sum d^2 <= 65025 C^3``, times ``4^frac_bits`` (chosen so the product stays below 2^62: 8 for C <= 1625);
  int16 input (a wide residual stream): ``|d| <= 65535 C``, frac_bits 2 for C = 384, 1 for C = 576, refused
  above C = 1023; normalized values carry 15 fractional bits.
- rmsnorm on a per-channel int16 input (a residual stream with one scale per channel): each channel first goes
  to one statistics scale ``S = max_c S_c / 2^10`` (``x'' = round_shift(x m_c, 16)``, ``m_c = round(S_c / S
  2^16) <= 2^26``, so ``|x m_c| < 2^41`` and ``|x''| <= 2^25``); then ``d = x''`` (no ``C`` factor), ``sum d^2 <=
  C 2^50``: frac_bits 1 for C = 576.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qcompiler.dialect.dyadic import quantize_multiplier, quantize_multipliers, round_shift, storage_dtype

# I-BERT's second-order fit of exp on [-ln2, 0]: exp(r) ~= A (r + B)^2 + C; max relative error 1.9e-3 there
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344
SOFTMAX_OUT_BITS = 7  # probabilities in int8 at scale 2^-7 (1.0 saturates to 127/128)
SOFTMAX_BITS_CHOICES = (7, 15)  # int8 or int16 probabilities
SOFTMAX_NORM_BITS = 62  # numerator of the normalising reciprocal
NORM_FRACTION_BITS = 15  # fractional bits of the normalized value before the affine rescale
# numerator of the reciprocal 2^47 / s: s < 2^31 keeps 16+ bits in it, and |d| <= s sqrt(C) / 2^f bounds
# |d * factor| by sqrt(C) 2^(47-f) < 2^55 (a 2^31 numerator, as in I-BERT, loses 0.4 % once s nears 2^23)
NORM_RECIP_BITS = 47
ISQRT_TVM_ITERATIONS = 8  # fixed Newton steps with a min() guard: enough from 2^ceil(bits/2) for n < 2^62


def bit_length(n: np.ndarray) -> np.ndarray:
    """Per-element ``int.bit_length`` of non-negative int64 values (exact, no floats)."""
    t = np.asarray(n, dtype=np.int64).copy()
    length = np.zeros_like(t)
    for step in (32, 16, 8, 4, 2, 1):
        big = t >= (np.int64(1) << step)
        length += np.where(big, step, 0)
        t = np.where(big, t >> step, t)
    return length + (t > 0)


def isqrt(n: np.ndarray) -> np.ndarray:
    """Exact ``floor(sqrt(n))`` for int64 ``0 <= n < 2^62`` by Newton's iteration.

    ``x <- floor((x + floor(n / x)) / 2)`` from ``x0 = 2^ceil(bits(n) / 2) > sqrt(n)``, stopping when the
    iterate stops decreasing (REFERENCES.md section 4); a fixed iteration count is wrong for small n and
    n = m^2 - 1.
    """
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < 0) or np.any(n >= np.int64(1) << 62):
        raise ValueError("isqrt: input must lie in [0, 2^62)")
    x = np.int64(1) << ((bit_length(n) + 1) // 2)
    active = n > 0
    while np.any(active):
        safe = np.where(active, x, 1)
        nxt = (safe + n // safe) >> 1
        decreasing = active & (nxt < x)
        x = np.where(decreasing, nxt, x)
        active = decreasing
    return np.where(n > 0, x, 0)


def isqrt_fixed_iterations(n: np.ndarray, iterations: int = ISQRT_TVM_ITERATIONS) -> np.ndarray:
    """The branch-free form the kernels use: ``x <- min(x, (x + n // x) >> 1)`` a fixed number of times.

    Equal to :func:`isqrt` whenever ``iterations`` covers the longest strictly decreasing run (tested).
    """
    n = np.asarray(n, dtype=np.int64)
    x = np.int64(1) << ((bit_length(n) + 1) // 2)
    for _ in range(iterations):
        x = np.maximum(np.minimum(x, (x + n // x) >> 1), 1)  # never 0: floor(sqrt(n)) >= 1 for n >= 1
    return np.where(n > 0, x, 0)


# --- softmax ---------------------------------------------------------------------------------------------
SOFTMAX_MIN_LN2_Q = 1 << 10  # finer input steps than this cost nothing and keep the floors of b, c below 0.1 %


def softmax_constants(scale: float) -> dict[str, int]:
    """Integer attributes of IntSoftmax for an input scale ``S`` (float, once, at lowering time).

    A coarse input (int8 scores) is first shifted left by ``input_shift`` bits, exactly, so that
    ``ln2_q = floor(ln2 / S')`` with ``S' = S / 2^input_shift`` is at least 2^10: otherwise the floors of the
    polynomial constants alone cost several percent (S = 0.05 gives ln2_q = 13 and a 3.6 % error).
    """
    if not 0.0 < scale < math.log(2.0):
        raise ValueError(f"softmax input scale {scale} must lie in (0, ln2)")
    input_shift = max(0, math.ceil(math.log2(SOFTMAX_MIN_LN2_Q * scale / math.log(2.0))))
    fine = scale / (1 << input_shift)
    ln2_q = math.floor(math.log(2.0) / fine)
    if ln2_q > 1 << 14:
        raise ValueError(f"softmax input scale {scale} too small: floor(ln2 / S) = {ln2_q} > 2^14")
    return {
        "input_shift": input_shift,
        "ln2_q": ln2_q,
        "b_q": math.floor(EXP_B / fine),
        "c_q": math.floor(EXP_C / (EXP_A * fine * fine)),
    }


def int_exp(q: np.ndarray, ln2_q: int, b_q: int, c_q: int) -> np.ndarray:
    """I-BERT i-exp for ``q <= 0``: ``((r + b_q)^2 + c_q) >> z`` with ``q = -z ln2_q + r``, r in (-ln2_q, 0]."""
    q = np.asarray(q, dtype=np.int64)
    z = (-q) // ln2_q
    r = q + z * ln2_q
    poly = (r + b_q) * (r + b_q) + c_q
    return np.where(z < 62, poly >> np.minimum(z, 62), 0)


def int_softmax(
    x: np.ndarray,
    ln2_q: int,
    b_q: int,
    c_q: int,
    input_shift: int = 0,
    mask: np.ndarray | None = None,
    axis: int = -1,
    out_bits: int = SOFTMAX_OUT_BITS,
) -> np.ndarray:
    """Softmax along ``axis`` in integers; output probabilities at scale ``2^-out_bits``: int8 for 7 bits (the
    default), int16 for 15 (long rows, where 2^-7 rounds most probabilities to 0).

    ``e = int_exp((x - max) << input_shift)``; ``factor = floor(2^62 / sum(e))`` (e <= sum, so
    ``e * factor <= 2^62`` fits int64; I-BERT's 2^32 numerator loses all precision once the sum nears 2^32);
    ``y = min(round_shift(e * factor, 55), 127)``. With a boolean ``mask`` (numpy broadcasting), false entries
    are left out (e = 0, and of the max): the integer form of adding -inf; a row with nothing left is all 0.
    """
    x = np.asarray(x, dtype=np.int64)
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
    floor = np.iinfo(np.int64).min // 4
    row_max = np.where(keep, x, floor).max(axis=axis, keepdims=True)
    row_max = np.where(row_max == floor, 0, row_max)
    e = np.where(keep, int_exp(np.minimum(x - row_max, 0) << input_shift, ln2_q, b_q, c_q), 0)
    total = e.sum(axis=axis, keepdims=True)
    factor = np.where(total > 0, (np.int64(1) << SOFTMAX_NORM_BITS) // np.maximum(total, 1), 0)
    if out_bits not in SOFTMAX_BITS_CHOICES:
        raise ValueError(f"IntSoftmax: out_bits must be one of {SOFTMAX_BITS_CHOICES}, got {out_bits}")
    top = (1 << out_bits) - 1
    y = round_shift(e * factor, np.int64(SOFTMAX_NORM_BITS - out_bits))
    return np.minimum(y, top).astype(storage_dtype(0, top))


# --- LayerNorm / RMSNorm ------------------------------------------------------------------------------------
MAX_NORM_CHANNELS = 1 << 15
MAX_FRAC_BITS = 8


#: per-channel input (prescaled RMSNorm): fractional bits of the channel multipliers, and the range of the
#: statistics scale below the coarsest channel's (channels finer than ``max S_c / 2^PRESCALE_RANGE_BITS`` are refused)
PRESCALE_BITS = 16
PRESCALE_RANGE_BITS = 10
PRESCALED_MAX = 1 << 25  # |x''| for an int16 input: 2^15 * 2^PRESCALE_RANGE_BITS


def layernorm_prescale(input_scales: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-channel multipliers ``m_c`` and the statistics scale ``S`` of a prescaled RMSNorm (the module docstring).

    Raises:
        ValueError: a channel's scale is below ``S`` (more than 2^10 finer than the coarsest channel).
    """
    scales = np.asarray(input_scales, dtype=np.float64).reshape(-1)
    stat = float(scales.max()) / (1 << PRESCALE_RANGE_BITS)
    if float(scales.min()) < stat * (1 - 1e-9):
        raise ValueError(
            f"IntLayerNorm: per-channel input scales span {scales.max() / scales.min():.0f}x, above the "
            f"{1 << PRESCALE_RANGE_BITS}x a prescaled norm carries; floor the finest channels' scales"
        )
    multipliers = np.round(scales / stat * (1 << PRESCALE_BITS))
    return multipliers.astype(np.int32), stat


def layernorm_frac_bits(channels: int, input_bits: int = 8, prescaled: bool = False) -> int:
    """Fractional bits of the integer standard deviation: as many as keep ``sum(d^2) 4^f`` below 2^62 for
    ``input_bits``-bit inputs (``|d| <= (2^bits - 1) C``; prescaled: ``|d| <= 2^25``)."""
    if not 1 <= channels <= MAX_NORM_CHANNELS:
        raise ValueError(f"IntLayerNorm: {channels} channels is outside [1, {MAX_NORM_CHANNELS}]")
    if prescaled:
        worst_bits = math.log2(float(PRESCALED_MAX) ** 2 * channels)
    else:
        worst_bits = math.log2(float((1 << input_bits) - 1) ** 2 * channels**3)
    frac_bits = math.floor((61.9 - worst_bits) / 2)
    if frac_bits < 0:
        raise ValueError(
            f"IntLayerNorm: {channels} channels of {input_bits}-bit input overflow the int64 sum of squares; "
            "quantize the norm's input to int8"
        )
    return min(MAX_FRAC_BITS, frac_bits)


def layernorm_constants(
    input_scale: float,
    output_scale: float | np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    epsilon: float,
    channels: int,
    input_bits: int = 8,
    prescaled: bool = False,
) -> dict[str, np.ndarray | int]:
    """Integer parameters of IntLayerNorm: signed per-channel multipliers for ``gamma / S_y`` applied to a
    normalized value with 15 fractional bits, the output bias ``round(beta / S_y)``, the fractional bits ``f``
    of the integer standard deviation and epsilon in units of the radicand ``sum(d^2) 4^f / C = C^2 4^f var /
    S_x^2`` (prescaled RMSNorm: ``4^f mean(x^2) / S^2``, ``input_scale`` the statistics scale ``S``).
    ``output_scale`` is one scale or one per channel (a per-channel quantized output)."""
    frac_bits = layernorm_frac_bits(channels, input_bits, prescaled)
    gammas = np.broadcast_to(np.asarray(gamma, dtype=np.float64).reshape(-1), (channels,))
    out_scales = np.broadcast_to(np.asarray(output_scale, dtype=np.float64).reshape(-1), (channels,))
    mults, shifts = [], []
    for g, out_scale in zip(gammas, out_scales, strict=True):
        real = abs(g) / out_scale / (1 << NORM_FRACTION_BITS)
        if real == 0.0:
            mults.append(0)
            shifts.append(31)
            continue
        m, s = quantize_multiplier(real)
        mults.append(int(math.copysign(m, g)))
        shifts.append(s)
    bias = np.round(np.broadcast_to(np.asarray(beta, dtype=np.float64).reshape(-1), (channels,)) / out_scales)
    spread = 1.0 if prescaled else float(channels * channels)
    eps_q = round(epsilon * spread * 4.0**frac_bits / (input_scale * input_scale))
    return {
        "frac_bits": frac_bits,
        "multiplier": np.array(mults, dtype=np.int32),
        "shift": np.array(shifts, dtype=np.int32),
        "bias": np.clip(bias, -(2**31), 2**31 - 1).astype(np.int32),
        "epsilon_q": int(min(eps_q, 2**62)),
    }


def int_layernorm(
    x: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    bias: np.ndarray,
    *,
    rms: bool = False,
    epsilon_q: int = 0,
    frac_bits: int = 0,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
    input_multiplier: np.ndarray | None = None,
) -> np.ndarray:
    """LayerNorm (or RMSNorm with ``rms``) over the last axis in integers, then a per-channel affine rescale.

    ``d = C x - sum(x)`` (``C x`` for RMSNorm); ``s = isqrt(floor(sum(d^2) 4^f / C) + epsilon_q)``
    (= C std 2^f in input steps); ``factor = floor(2^47 / s)``; ``n = (d * factor) >> (32 - f)`` (the normalized
    value times 2^15); ``y = clamp(round_shift(n * multiplier, shift) + bias + zero_point, lo, hi)``.
    With ``input_multiplier`` (RMSNorm of a per-channel input): ``d = round_shift(x m_c, 16)`` instead, each channel
    at the one statistics scale (:func:`layernorm_prescale`).
    """
    x = np.asarray(x, dtype=np.int64)
    channels = x.shape[-1]
    if not 0 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"IntLayerNorm: frac_bits {frac_bits} outside [0, {MAX_FRAC_BITS}]")
    if input_multiplier is not None:
        if not rms:
            raise ValueError("IntLayerNorm: per-channel input multipliers need rms = 1 (RMSNorm)")
        d = round_shift(x * np.asarray(input_multiplier, np.int64).reshape(-1), np.int64(PRESCALE_BITS))
    else:
        d = channels * x if rms else channels * x - x.sum(axis=-1, keepdims=True)
    s = isqrt(((d * d).sum(axis=-1, keepdims=True) << (2 * frac_bits)) // channels + epsilon_q)
    factor = (np.int64(1) << NORM_RECIP_BITS) // np.maximum(s, 1)
    normalized = (d * factor) >> (NORM_RECIP_BITS - NORM_FRACTION_BITS - frac_bits)
    mult = np.asarray(multiplier, dtype=np.int64)
    y = round_shift(normalized * mult, np.asarray(shift, dtype=np.int64)) + np.asarray(bias, np.int64) + zero_point
    return np.clip(y, lo, hi).astype(storage_dtype(lo, hi))


# --- shared output stage ------------------------------------------------------------------------------------
def prescaled_requantize_constants(
    value_scale: float, max_abs_value: float, output_scale: float | np.ndarray
) -> dict[str, Any]:
    """(pre_shift, multiplier, shift) for ``y = round_shift(round_shift(V, t) * b, c)``, V up to ``max_abs_value``.

    ``t`` brings V below 2^31 so the product with ``b < 2^31`` stays below 2^62; ``b 2^-c = S_V 2^t / S_y``.
    A per-channel ``output_scale`` (array) gives int32 arrays of multipliers and shifts.
    """
    pre_shift = max(0, math.ceil(math.log2(max(max_abs_value, 1.0))) + 1 - 31)
    scales = np.asarray(output_scale, dtype=np.float64)
    if scales.ndim == 0:
        multiplier, shift = quantize_multiplier(value_scale * (1 << pre_shift) / float(scales))
        return {"pre_shift": pre_shift, "multiplier": multiplier, "shift": shift}
    multipliers, shifts = quantize_multipliers(value_scale * (1 << pre_shift) / scales)
    return {"pre_shift": pre_shift, "multiplier": multipliers, "shift": shifts}


def _output_stage(value: np.ndarray, pre_shift: int, multiplier, shift, zero_point: int, lo: int, hi: int):
    """``clamp(round_shift(round_shift(V, t) * b, c) + z)``; ``b``, ``c`` scalars or one per channel of the last
    axis (a per-channel quantized output)."""
    reduced = round_shift(value, np.int64(pre_shift)) if pre_shift else value
    mult: np.ndarray = np.asarray(multiplier, dtype=np.int64).reshape(-1)
    sh: np.ndarray = np.asarray(shift, dtype=np.int64).reshape(-1)
    if mult.size == 1:
        mult, sh = mult.reshape(()), sh.reshape(())
    y = round_shift(reduced * mult, sh) + zero_point
    return np.clip(y, lo, hi).astype(storage_dtype(lo, hi))


def _fine_shift(scale: float, unit: float, minimum: int = 1 << 10) -> int:
    """Left shift making ``floor(unit / (scale / 2^k)) >= minimum`` (exact refinement of an int8 input)."""
    return max(0, math.ceil(math.log2(minimum * scale / unit)))


# --- GELU (I-BERT i-GELU with i-erf) ---------------------------------------------------------------------
ERF_A, ERF_B = 0.2888, 1.769  # erf(x) ~= sgn(x) (1 - A (min(|x|, B) - B)^2)


def gelu_constants(input_scale: float, output_scale: float | np.ndarray) -> dict[str, Any]:
    """Integer attributes of IntGelu for int8 input at ``input_scale`` and int8 output at ``output_scale``."""
    erf_step = input_scale / math.sqrt(2.0)  # erf(x / sqrt 2): the same integer q, a step of S / sqrt 2
    input_shift = _fine_shift(erf_step, ERF_B)
    fine = erf_step / (1 << input_shift)
    b_q = math.floor(ERF_B / fine)
    c_q = math.floor(1.0 / (ERF_A * fine * fine))
    erf_scale = ERF_A * fine * fine  # erf ~= erf_scale * L, L in [-c_q, c_q]
    max_q = 128 << input_shift
    value_scale = (input_scale / (1 << input_shift)) * erf_scale / 2.0
    out = prescaled_requantize_constants(value_scale, max_q * 2.0 * c_q, output_scale)
    return {"input_shift": input_shift, "b_q": b_q, "c_q": c_q, **out}


def int_gelu(
    x: np.ndarray,
    multiplier: int | np.ndarray,
    shift: int | np.ndarray,
    *,
    input_shift: int,
    b_q: int,
    c_q: int,
    pre_shift: int,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
) -> np.ndarray:
    """``q = x << input_shift``; ``L = sgn(q) (c_q - (min(|q|, b_q) - b_q)^2)`` (= erf(x / sqrt 2) / S_erf);
    ``V = q (L + c_q)`` (= 2 GELU(x) / (S S_erf)); ``y = requant(round_shift(V, pre_shift))``."""
    q = np.asarray(x, dtype=np.int64) << input_shift
    clipped = np.minimum(np.abs(q), b_q) - b_q
    erf_level = np.sign(q) * (c_q - clipped * clipped)
    return _output_stage(q * (erf_level + c_q), pre_shift, multiplier, shift, zero_point, lo, hi)


# --- sigmoid and SiLU (i-exp of -|x|) ---------------------------------------------------------------------
SIGMOID_BITS = 30  # sigmoid carried as an integer in [0, 2^30]


def sigmoid_constants(
    input_scale: float, output_scale: float | np.ndarray, silu: bool, input_bits: int = 8
) -> dict[str, Any]:
    """Integer attributes of IntSigmoid (``silu``: x * sigmoid(x)) for int8 (or int16: ``input_bits``) input and
    int8 output. ``x sigma`` is at most ``2^(bits - 1) 2^30`` (2^45 for int16: the int64 product is exact); the
    pre-shift brings it under 2^31 before the output multiplier."""
    input_shift = _fine_shift(input_scale, math.log(2.0))
    fine = input_scale / (1 << input_shift)
    exp = {"ln2_q": math.floor(math.log(2.0) / fine), "b_q": math.floor(EXP_B / fine),
           "c_q": math.floor(EXP_C / (EXP_A * fine * fine))}  # fmt: skip
    one_q = math.floor(1.0 / (EXP_A * fine * fine))  # 1.0 at the i-exp output scale
    if silu:
        value_scale, max_value = input_scale / (1 << SIGMOID_BITS), float(1 << (input_bits - 1)) * (1 << SIGMOID_BITS)
    else:
        value_scale, max_value = 1.0 / (1 << SIGMOID_BITS), float(1 << SIGMOID_BITS)
    out = prescaled_requantize_constants(value_scale, max_value, output_scale)
    return {"input_shift": input_shift, **exp, "one_q": one_q, **out}


def int_sigmoid(
    x: np.ndarray,
    multiplier: int | np.ndarray,
    shift: int | np.ndarray,
    *,
    input_shift: int,
    ln2_q: int,
    b_q: int,
    c_q: int,
    one_q: int,
    pre_shift: int,
    silu: bool = False,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
) -> np.ndarray:
    """``e = i_exp(-|x| << input_shift)``; ``s = floor(e 2^30 / (e + one_q))`` (= sigmoid(-|x|) 2^30);
    ``sigma = x >= 0 ? 2^30 - s : s``; ``V = silu ? x sigma : sigma``; ``y = requant(round_shift(V, pre_shift))``."""
    x = np.asarray(x, dtype=np.int64)
    e = int_exp(-(np.abs(x) << input_shift), ln2_q, b_q, c_q)
    low = (e << SIGMOID_BITS) // (e + one_q)
    sigma = np.where(x >= 0, (np.int64(1) << SIGMOID_BITS) - low, low)
    value = x * sigma if silu else sigma
    return _output_stage(value, pre_shift, multiplier, shift, zero_point, lo, hi)
