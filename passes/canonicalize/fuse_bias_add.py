"""Fold a constant per-channel Add after Conv / Gemm / MatMul into the op's bias input, and a constant
per-channel Mul after Conv into its weights.

Exporters often write ``Add(Conv(x, W), b)`` with ``b`` of shape [C, 1, 1], or ``Add(MatMul(x, W), b)``;
the quantizer and the integer lowering want the bias inside the op, where it becomes an int32 bias.
Paddle2ONNX writes an inference BatchNorm as ``Add(Mul(Conv(x, W), s), t)`` (PP-OCR's recognizer): left there,
the convolution's output, the product and the sum are each rounded to int8; folded, ``Conv(x, W s, t)`` is one
integer convolution with one rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, RewriteRuleClassBase, RewriteRuleSet


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _fresh_name(context, base: str) -> str | None:
    """``base`` if no initializer of the graph has that name, else None (the rule then declines).

    New initializers are named after the replaced ``Add``'s output, unique in the graph: exporters share one
    initializer between equal constants (every zero bias of a freshly initialised model), so a name derived
    from the bias or the weight would collide, and onnxscript leaves a colliding initializer dangling.
    """
    taken = context.graph_or_function.initializers if context is not None else {}
    return None if base in taken else base


def _per_channel(bias: np.ndarray, channels: int, channel_axis_from_end: int) -> np.ndarray | None:
    """Return ``bias`` as a [channels] vector if it only varies along the channel axis, else None."""
    if bias.size == 1:
        return np.full((channels,), bias.reshape(()), dtype=bias.dtype)
    shape = list(bias.shape)
    if bias.size != channels or len(shape) < channel_axis_from_end:
        return None
    if shape[-channel_axis_from_end] != channels:
        return None
    return bias.reshape(channels)


def _is_row_bias(bias: np.ndarray, width: int, rank: int) -> bool:
    """True if ``bias`` varies only along the last axis (width 1 or ``width``) and, added to a product of
    ``rank`` dimensions, neither raises its rank nor widens it: then it is the op's bias, with the same sum."""
    if bias.ndim > rank or any(d != 1 for d in bias.shape[:-1]):
        return False
    return bias.ndim == 0 or bias.shape[-1] in (1, width)


def _shift_check(context, w: ir.Value, shift: ir.Value, sum_out: ir.Value, bias: ir.Value | None) -> MatchResult:
    result = MatchResult()
    if _fresh_name(context, f"{sum_out.name}_bias") is None:
        return result.fail(f"initializer name {sum_out.name}_bias is taken")
    weight, add = _const(w), _const(shift)
    if weight is None:
        return result.fail("Conv weight is not constant")
    if bias is not None and _const(bias) is None:
        return result.fail("Conv bias is not constant")
    if add is None:
        return result.fail("added tensor is not constant")
    if _per_channel(add, weight.shape[0], weight.ndim - 1) is None:
        return result.fail(f"added constant of shape {add.shape} is not per output channel")
    if add.ndim > weight.ndim:
        return result.fail("added constant would broadcast the output to a higher rank")
    return result


def _shifted_conv(op, x, w, shift, conv_out, sum_out, bias=None):
    weight, add = _const(w), _const(shift)
    assert weight is not None and add is not None
    vector = _per_channel(add, weight.shape[0], weight.ndim - 1)
    assert vector is not None
    old = _const(bias)
    total = vector.astype(weight.dtype) if old is None else (old.reshape(-1) + vector).astype(old.dtype)
    new_bias = op.initializer(ir.tensor(total), name=f"{sum_out.name}_bias")
    return op.Conv(x, w, new_bias, **{k: a for k, a in conv_out.producer().attributes.items()})


class _ConvAddBias(RewriteRuleClassBase):
    """``Add(Conv(x, W), b) -> Conv(x, W, b)`` for a Conv without bias and b constant per output channel."""

    def pattern(self, op, x, w, shift):
        conv = op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv_out"])
        return op.Add(conv, shift, _outputs=["sum_out"])

    def check(self, context, x, w, shift, conv_out, sum_out, **_) -> MatchResult:
        return _shift_check(context, w, shift, sum_out, None)

    def rewrite(self, op, x, w, shift, conv_out, sum_out, **_):
        return _shifted_conv(op, x, w, shift, conv_out, sum_out)


class _ConvBiasAdd(RewriteRuleClassBase):
    """``Add(Conv(x, W, b), t) -> Conv(x, W, b + t)`` for constant b and t per output channel (PP-LCNet's
    learnable affine after a convolution whose BatchNorm was folded)."""

    def pattern(self, op, x, w, bias, shift):
        conv = op.Conv(x, w, bias, _allow_other_attributes=True, _outputs=["conv_out"])
        return op.Add(conv, shift, _outputs=["sum_out"])

    def check(self, context, x, w, bias, shift, conv_out, sum_out, **_) -> MatchResult:
        return _shift_check(context, w, shift, sum_out, bias)

    def rewrite(self, op, x, w, bias, shift, conv_out, sum_out, **_):
        return _shifted_conv(op, x, w, shift, conv_out, sum_out, bias)


def _scale_check(context, w: ir.Value, scale: ir.Value, product_out: ir.Value, bias: ir.Value | None) -> MatchResult:
    result = MatchResult()
    names = [f"{product_out.name}_weight", f"{product_out.name}_bias"]
    if any(_fresh_name(context, name) is None for name in names):
        return result.fail(f"one of the initializer names {names} is taken")
    weight, factor = _const(w), _const(scale)
    if weight is None:
        return result.fail("Conv weight is not constant")
    if bias is not None and _const(bias) is None:
        return result.fail("Conv bias is not constant")
    if factor is None:
        return result.fail("the factor is not constant")
    if _per_channel(factor, weight.shape[0], weight.ndim - 1) is None or factor.ndim > weight.ndim:
        return result.fail(f"the factor of shape {factor.shape} is not per output channel")
    return result


def _scaled_conv(op, x, w, scale, conv_out, product_out, bias=None):
    weight, factor = _const(w), _const(scale)
    assert weight is not None and factor is not None
    vector = _per_channel(factor, weight.shape[0], weight.ndim - 1)
    assert vector is not None
    name = product_out.name
    scaled = (weight * vector.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(weight.dtype)
    inputs = [x, op.initializer(ir.tensor(scaled), name=f"{name}_weight")]
    shift = _const(bias)
    if shift is not None:
        inputs.append(op.initializer(ir.tensor((shift.reshape(-1) * vector).astype(shift.dtype)), name=f"{name}_bias"))
    return op.Conv(*inputs, **{k: a for k, a in conv_out.producer().attributes.items()})


class _ConvMulScale(RewriteRuleClassBase):
    """``Mul(Conv(x, W), s) -> Conv(x, W s)`` for constant W and s constant per output channel (any sign:
    scaling a weight row is exact)."""

    def pattern(self, op, x, w, scale):
        conv = op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv_out"])
        return op.Mul(conv, scale, _outputs=["product_out"])

    def check(self, context, x, w, scale, conv_out, product_out, **_) -> MatchResult:
        return _scale_check(context, w, scale, product_out, None)

    def rewrite(self, op, x, w, scale, conv_out, product_out, **_):
        return _scaled_conv(op, x, w, scale, conv_out, product_out)


class _ConvBiasMulScale(RewriteRuleClassBase):
    """The same with a constant bias: ``Mul(Conv(x, W, b), s) -> Conv(x, W s, b s)``."""

    def pattern(self, op, x, w, bias, scale):
        conv = op.Conv(x, w, bias, _allow_other_attributes=True, _outputs=["conv_out"])
        return op.Mul(conv, scale, _outputs=["product_out"])

    def check(self, context, x, w, bias, scale, conv_out, product_out, **_) -> MatchResult:
        return _scale_check(context, w, scale, product_out, bias)

    def rewrite(self, op, x, w, bias, scale, conv_out, product_out, **_):
        return _scaled_conv(op, x, w, scale, conv_out, product_out, bias)


def _gemm_width(w: ir.Value, gemm_out: ir.Value) -> int | None:
    """N of a Gemm's [M, N] output: from its constant weight (and ``transB``), else from the inferred shape."""
    weight = _const(w)
    node = gemm_out.producer()
    if weight is not None and weight.ndim == 2 and node is not None:
        return int(weight.shape[0 if node.attributes.get_int("transB", 0) else 1])
    width = gemm_out.shape[-1] if gemm_out.shape is not None and len(gemm_out.shape) == 2 else None
    return width if isinstance(width, int) else None


class _GemmAddBias(RewriteRuleClassBase):
    """``Add(Gemm(x, W), b) -> Gemm(x, W, b)`` for a Gemm without bias; its ``beta`` (which scaled no C before)
    is dropped, so the new C is added as it is."""

    def pattern(self, op, x, w, bias):
        return op.Add(op.Gemm(x, w, _allow_other_attributes=True, _outputs=["gemm_out"]), bias)

    def check(self, context, x, w, bias, gemm_out, **_) -> MatchResult:
        result = MatchResult()
        add = _const(bias)
        if add is None:
            return result.fail("added tensor is not constant")
        width = _gemm_width(w, gemm_out)
        if width is None:
            return result.fail("Gemm output width is not known")
        if not _is_row_bias(add, width, 2):
            return result.fail(f"added constant of shape {add.shape} is not a bias of width {width}")
        return result

    def rewrite(self, op, x, w, bias, gemm_out, **_):
        node = gemm_out.producer()
        return op.Gemm(x, w, bias, **{k: a for k, a in node.attributes.items() if k != "beta"})


class _MatMulAddBias(RewriteRuleClassBase):
    """``Add(MatMul(x, W), b) -> Gemm(x, W, b)`` for 2-D x, constant W [K, N] and constant b."""

    def pattern(self, op, x, w, bias):
        return op.Add(op.MatMul(x, w), bias)

    def check(self, context, x, w, bias, **_) -> MatchResult:
        result = MatchResult()
        weight, add = _const(w), _const(bias)
        if weight is None or weight.ndim != 2:
            return result.fail("MatMul weight is not a constant matrix")
        if add is None:
            return result.fail("added tensor is not constant")
        if x.shape is None or len(x.shape) != 2:
            return result.fail("MatMul input is not known to be 2-D")
        if not _is_row_bias(add, weight.shape[1], 2):
            return result.fail(f"added constant of shape {add.shape} is not a bias of width {weight.shape[1]}")
        return result

    def rewrite(self, op, x, w, bias, **_):
        return op.Gemm(x, w, bias)


class _BatchedMatMulAddBias(RewriteRuleClassBase):
    """``Add(MatMul(x, W), b) -> Reshape(Gemm(Reshape(x, [-1, K]), W, b), [*lead, N])`` for N-D x with static
    leading dims (transformer linears on [batch, tokens, features]): one integer linear with an int32 bias."""

    def pattern(self, op, x, w, bias):
        return op.Add(op.MatMul(x, w), bias, _outputs=["sum_out"])

    def check(self, context, x, w, bias, sum_out, **_) -> MatchResult:
        result = MatchResult()
        names = [f"{sum_out.name}_{suffix}" for suffix in ("flat_shape", "bias", "out_shape")]
        if any(_fresh_name(context, name) is None for name in names):
            return result.fail(f"one of the initializer names {names} is taken")
        weight, add = _const(w), _const(bias)
        if weight is None or weight.ndim != 2:
            return result.fail("MatMul weight is not a constant matrix")
        if x.shape is None or len(x.shape) < 3 or not all(isinstance(d, int) for d in x.shape):
            return result.fail("MatMul input is not known to be static and of rank >= 3")
        if add is None or not _is_row_bias(add, weight.shape[1], len(x.shape)):
            return result.fail("added tensor is not a constant bias along the last axis of the product's rank")
        return result

    def rewrite(self, op, x, w, bias, sum_out, **_):
        weight = _const(w)
        assert weight is not None and x.shape is not None
        k, n = weight.shape
        lead = [int(d) for d in x.shape[:-1]]
        rows = int(np.prod(lead))
        name = sum_out.name
        flat = op.Reshape(x, op.initializer(ir.tensor(np.array([-1, k], np.int64)), name=f"{name}_flat_shape"))
        vector = np.broadcast_to(_const(bias).reshape(-1), (n,)).astype(weight.dtype)  # type: ignore[union-attr]
        gemm = op.Gemm(flat, w, op.initializer(ir.tensor(vector), name=f"{name}_bias"))
        out = op.Reshape(gemm, op.initializer(ir.tensor(np.array([*lead, n], np.int64)), name=f"{name}_out_shape"))
        # static shapes on the new values: later passes read them (which ops keep the last axis)
        for value, shape in ((flat, [rows, k]), (gemm, [rows, n]), (out, [*lead, n])):
            value.shape = ir.Shape(shape)
            value.dtype = x.dtype
        return out


class FuseBiasAddPass(RewritePass):
    """Constant per-channel ``Add`` after Conv / Gemm / MatMul becomes the op's bias; a constant per-channel
    ``Mul`` after Conv goes into its weights (and bias) first."""

    def __init__(self) -> None:
        super().__init__(
            RewriteRuleSet(
                [
                    _ConvMulScale().rule(),
                    _ConvBiasMulScale().rule(),
                    _ConvAddBias().rule(),
                    _ConvBiasAdd().rule(),
                    _GemmAddBias().rule(),
                    _MatMulAddBias().rule(),
                    _BatchedMatMulAddBias().rule(),
                ],
                commute=True,  # Mul(s, Conv(...)) as Paddle2ONNX writes it, Add(b, MatMul(...))
            )
        )
