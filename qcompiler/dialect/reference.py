"""Numpy reference semantics of the ``qcompiler`` domain: the definition every backend must match.

All arithmetic is exact integer arithmetic with int64 intermediates. The classes plug into
``onnx.reference.ReferenceEvaluator`` through ``new_ops=REFERENCE_OPS``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcompiler.dialect import nonlinear
from qcompiler.dialect.dyadic import round_shift, row_exponents, row_shift, storage_dtype
from qcompiler.dialect.hadamard import hadamard_transform
from qcompiler.dialect.int4 import unpack_int4
from qcompiler.dialect.schemas import DOMAIN


def _channel_view(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """Reshape a scalar or per-channel parameter so it broadcasts along ``axis`` of a rank-``rank`` tensor."""
    param = np.asarray(param, dtype=np.int64)
    if param.size == 1:
        return param.reshape(())
    axis = axis % rank
    shape = [1] * rank
    shape[axis] = param.size
    return param.reshape(shape)


def requantize(
    x: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    *,
    axis: int = 1,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
    row_exponent: np.ndarray | None = None,
) -> np.ndarray:
    """``clamp(((x*b + 2^(c-1)) >> c) + z, lo, hi)`` in :func:`storage_dtype` (int8, or int16 for a wide clamp);
    ``b``, ``c`` scalar or per channel on ``axis``; with ``row_exponent`` e ``[..., 1]``, each row's shift is
    ``c - e``."""
    x64 = np.asarray(x, dtype=np.int64)
    mult = _channel_view(multiplier, x64.ndim, axis)
    sh = _channel_view(shift, x64.ndim, axis)
    if row_exponent is not None:
        sh = sh - np.asarray(row_exponent, dtype=np.int64)
    if np.any(sh < 1) or np.any(sh > 62):
        raise ValueError("Requantize: shift (less the row exponent) must lie in [1, 62]")
    y = round_shift(x64 * mult, sh) + zero_point
    return np.clip(y, lo, hi).astype(storage_dtype(lo, hi))


def rescale_add(
    a: np.ndarray,
    b: np.ndarray,
    multiplier_a: np.ndarray,
    multiplier_b: np.ndarray,
    shift: np.ndarray,
    *,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
) -> np.ndarray:
    """``clamp(round_shift(a*b_a + b*b_b, c) + z, lo, hi)``; the multipliers are scalars or one per channel of
    the last axis (numpy broadcasting), the shift one scalar; int8 or int16 addends."""
    rank = max(np.ndim(a), np.ndim(b))
    mult_a = _channel_view(multiplier_a, rank, -1)
    mult_b = _channel_view(multiplier_b, rank, -1)
    total = np.asarray(a, dtype=np.int64) * mult_a + np.asarray(b, dtype=np.int64) * mult_b
    y = round_shift(total, np.int64(np.asarray(shift).reshape(()))) + zero_point
    return np.clip(y, lo, hi).astype(storage_dtype(lo, hi))


def qgemm(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """int8 [..., K] x int8 [N, K]^T + int32 bias -> int32 accumulators (exact; checked against overflow)."""
    acc = np.matmul(x.astype(np.int64), w.astype(np.int64).T) + bias.astype(np.int64)
    return _as_int32(acc, "QGemm")


def qgemm_int4(x: np.ndarray, w: np.ndarray, group_scale: np.ndarray, bias: np.ndarray, group_size: int) -> np.ndarray:
    """int8 ``x [..., K]`` times packed int4 ``w [N, ceil(K/2)]`` with one integer rescale per (row, group), plus
    the int32 bias -> int32 accumulators (exact; checked against overflow)."""
    k = x.shape[-1]
    codes = unpack_int4(np.asarray(w, dtype=np.uint8))
    if codes.shape[-1] not in (k, k + 1):
        raise ValueError(f"QGemmInt4: packed weights hold {codes.shape[-1]} codes per row, the input has K = {k}")
    groups = -(-k // group_size)
    scale = np.asarray(group_scale, dtype=np.int64)
    if scale.shape != (codes.shape[0], groups):
        raise ValueError(f"QGemmInt4: group_scale must be [N, {groups}] for K = {k}, got {list(scale.shape)}")
    expanded = codes[:, :k].astype(np.int64) * np.repeat(scale, group_size, axis=1)[:, :k]
    acc = np.matmul(x.astype(np.int64), expanded.T) + bias.astype(np.int64)
    return _as_int32(acc, "QGemmInt4")


def conv2d_int(
    x: np.ndarray,
    w: np.ndarray,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int,
) -> np.ndarray:
    """Exact int64 2-D NCHW convolution (cross-correlation, as ONNX Conv)."""
    _, c, _, _ = x.shape
    m, cg, kh, kw = w.shape
    if c != cg * group:
        raise ValueError(f"QConv: input has {c} channels, weights expect {cg} x group {group}")
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    dh, dw = dilations
    window = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    window = window[:, :, :: strides[0], :: strides[1], ::dh, ::dw]  # [n, c, oh, ow, kh, kw]
    out_per_group = m // group
    outs = []
    for g in range(group):
        xs = window[:, g * cg : (g + 1) * cg]
        ws = w[g * out_per_group : (g + 1) * out_per_group].astype(np.int64)
        outs.append(np.einsum("nchwij,mcij->nmhw", xs, ws, optimize=True))
    return np.concatenate(outs, axis=1)


#: IntDiv's shift bound: an int16 divisor (|b| <= 2^15) times 2^shift, doubled, stays below 2^63
INT_DIV_MAX_SHIFT = 46


def int_div(
    a: np.ndarray,
    b: np.ndarray,
    multiplier: int,
    shift: int,
    *,
    zero_point: int = 0,
    lo: int = -128,
    hi: int = 127,
) -> np.ndarray:
    """``clamp(round(a b_m / (b 2^c)) + z, lo, hi)`` with the dialect's rounding (ties toward +inf), exact in
    int64: ``floor((2 n + d) / (2 d))`` for ``n = a b_m``, ``d = b 2^c`` (both negated when ``d < 0``). A zero
    divisor saturates by the numerator's sign (``hi``, ``lo``, or ``z`` for ``0 / 0``)."""
    if not 0 <= shift <= INT_DIV_MAX_SHIFT:
        raise ValueError(f"IntDiv: shift {shift} outside [0, {INT_DIV_MAX_SHIFT}]")
    n, d = np.broadcast_arrays(np.asarray(a, np.int64) * np.int64(multiplier), np.asarray(b, np.int64) << shift)
    sign = np.where(d < 0, -1, 1).astype(np.int64)
    n, d = n * sign, d * sign
    safe = np.where(d == 0, 1, d)
    quotient = np.floor_divide(2 * n + safe, 2 * safe) + zero_point
    saturated = np.where(n > 0, hi, np.where(n < 0, lo, zero_point))
    y = np.where(d == 0, saturated, quotient)
    return np.clip(y, lo, hi).astype(storage_dtype(lo, hi))


def _as_int32(acc: np.ndarray, op: str) -> np.ndarray:
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise OverflowError(f"{op}: int32 accumulator overflow; reduce the reduction length or bias range")
    return acc.astype(np.int32)


class Requantize(OpRun):
    op_domain = DOMAIN

    def _run(self, x, multiplier, shift, row_exponent=None, axis=1, zero_point=0, lo=-128, hi=127):
        return (
            requantize(x, multiplier, shift, axis=axis, zero_point=zero_point, lo=lo, hi=hi, row_exponent=row_exponent),
        )


class RowExponent(OpRun):
    op_domain = DOMAIN

    def _run(self, x, qmax=127, bound=0):
        e = row_exponents(x, qmax, bound)
        return (row_shift(x, e, qmax), e)


class RescaleAdd(OpRun):
    op_domain = DOMAIN

    def _run(self, a, b, multiplier_a, multiplier_b, shift, zero_point=0, lo=-128, hi=127):
        return (rescale_add(a, b, multiplier_a, multiplier_b, shift, zero_point=zero_point, lo=lo, hi=hi),)


class QGemm(OpRun):
    op_domain = DOMAIN

    def _run(self, x, w, bias, multiplier, shift, row_exponent=None, zero_point=0, lo=-128, hi=127):
        acc = qgemm(x, w, bias)
        epilogue = {"zero_point": zero_point, "lo": lo, "hi": hi, "row_exponent": row_exponent}
        return (requantize(acc, multiplier, shift, axis=-1, **epilogue),)


class QGemmInt4(OpRun):
    op_domain = DOMAIN

    def _run(
        self, x, w, group_scale, bias, multiplier, shift, row_exponent=None, group_size=128, zero_point=0, lo=-128,
        hi=127,
    ):  # fmt: skip
        acc = qgemm_int4(x, w, group_scale, bias, group_size)
        epilogue = {"zero_point": zero_point, "lo": lo, "hi": hi, "row_exponent": row_exponent}
        return (requantize(acc, multiplier, shift, axis=-1, **epilogue),)


class QConv(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        x,
        w,
        bias,
        multiplier,
        shift,
        strides=None,
        pads=None,
        dilations=None,
        group=1,
        zero_point=0,
        lo=-128,
        hi=127,
    ):
        strides = list(strides) if strides else [1, 1]
        pads = list(pads) if pads else [0, 0, 0, 0]
        dilations = list(dilations) if dilations else [1, 1]
        acc = conv2d_int(x, w, strides, pads, dilations, group) + bias.astype(np.int64).reshape(1, -1, 1, 1)
        acc32 = _as_int32(acc, "QConv")
        return (requantize(acc32, multiplier, shift, axis=1, zero_point=zero_point, lo=lo, hi=hi),)


class IntSoftmax(OpRun):
    op_domain = DOMAIN

    def _run(self, x, mask=None, ln2_q=1, b_q=0, c_q=0, input_shift=0, out_bits=nonlinear.SOFTMAX_OUT_BITS):
        return (nonlinear.int_softmax(x, ln2_q, b_q, c_q, input_shift, mask=mask, out_bits=out_bits),)


class IntLayerNorm(OpRun):
    op_domain = DOMAIN

    def _run(
        self, x, multiplier, shift, bias, input_multiplier=None, rms=0, epsilon_q=0, frac_bits=0, zero_point=0,
        lo=-128, hi=127,
    ):  # fmt: skip
        y = nonlinear.int_layernorm(
            x,
            multiplier,
            shift,
            bias,
            input_multiplier=input_multiplier,
            rms=bool(rms),
            epsilon_q=epsilon_q,
            frac_bits=frac_bits,
            zero_point=zero_point,
            lo=lo,
            hi=hi,
        )
        return (y,)


class IntGelu(OpRun):
    op_domain = DOMAIN

    def _run(self, x, multiplier, shift, input_shift=0, b_q=1, c_q=1, pre_shift=0, zero_point=0, lo=-128, hi=127):
        y = nonlinear.int_gelu(
            x,
            multiplier,
            shift,
            input_shift=input_shift,
            b_q=b_q,
            c_q=c_q,
            pre_shift=pre_shift,
            zero_point=zero_point,
            lo=lo,
            hi=hi,
        )
        return (y,)


class IntSigmoid(OpRun):
    op_domain = DOMAIN

    def _run(
        self,
        x,
        multiplier,
        shift,
        input_shift=0,
        ln2_q=1,
        b_q=0,
        c_q=0,
        one_q=1,
        silu=0,
        pre_shift=0,
        zero_point=0,
        lo=-128,
        hi=127,
    ):
        y = nonlinear.int_sigmoid(
            x,
            multiplier,
            shift,
            input_shift=input_shift,
            ln2_q=ln2_q,
            b_q=b_q,
            c_q=c_q,
            one_q=one_q,
            pre_shift=pre_shift,
            silu=bool(silu),
            zero_point=zero_point,
            lo=lo,
            hi=hi,
        )
        return (y,)


class IntDiv(OpRun):
    op_domain = DOMAIN

    def _run(self, a, b, multiplier, shift, zero_point=0, lo=-128, hi=127):
        mult, sh = int(np.asarray(multiplier).reshape(())), int(np.asarray(shift).reshape(()))
        return (int_div(a, b, mult, sh, zero_point=zero_point, lo=lo, hi=hi),)


class ISqrt(OpRun):
    op_domain = DOMAIN

    def _run(self, x):
        return (nonlinear.isqrt(np.asarray(x, np.int64)),)


class Hadamard(OpRun):
    op_domain = DOMAIN

    def _run(self, x, h):
        return (_as_int32(hadamard_transform(x, h), "Hadamard"),)


REFERENCE_OPS: list[type[OpRun]] = [
    Requantize, RowExponent, RescaleAdd, QGemm, QGemmInt4, QConv, IntSoftmax, IntLayerNorm, IntGelu, IntSigmoid,
    IntDiv, ISqrt, Hadamard,
]  # fmt: skip


def run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """Run a model (standard ONNX plus the ``qcompiler`` domain) on the reference interpreter."""
    evaluator = ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
    return list(evaluator.run(None, dict(feeds)))
