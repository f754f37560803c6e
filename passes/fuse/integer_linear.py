"""Fuse ``MatMulInteger/ConvInteger -> Add(bias) -> Requantize`` into ``QGemm`` / ``QConv``.

``Requantize(MatMulInteger(x, W) + b) = QGemm(x, W^T, b)``: the weight is stored transposed ([N, K], the
layout the CPU kernel packs from) and the epilogue attributes move over unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, RewriteRuleClassBase, RewriteRuleSet

from qcompiler.dialect import DOMAIN
from qcompiler.ir.graph import aligned_copy, const_array, unique_name

_EPILOGUE = ("zero_point", "lo", "hi")


def _fresh(op, array: np.ndarray, requant_out: ir.Value, suffix: str) -> ir.Value:
    """A new initializer named ``<requant_out>_<suffix>``, numbered if that is taken.

    Named after the ``Requantize`` output, not after the weight or bias: those may be shared (tied weights, equal
    biases stored once), and onnxscript leaves an initializer whose name collides dangling.
    """
    graph = requant_out.graph
    base = f"{requant_out.name}_{suffix}"
    return op.initializer(ir.tensor(array), name=unique_name(graph, base) if graph is not None else base)


def _int8_input(x: ir.Value) -> bool:
    """The fused ops read int8 activations, or int16 ones (W8A16); an input of unknown type is taken as the
    lowering writes it."""
    return x.dtype is None or x.dtype in (ir.DataType.INT8, ir.DataType.INT16)


def _epilogue(requant_out: ir.Value) -> dict[str, int]:
    node = requant_out.producer()
    assert node is not None
    defaults = {"zero_point": 0, "lo": -128, "hi": 127}
    return {k: node.attributes.get_int(k, defaults[k]) for k in _EPILOGUE}


class _FuseMatMulInteger(RewriteRuleClassBase):
    """``Requantize(MatMulInteger(x, W) + b, axis=-1) -> QGemm(x, W^T, b)``."""

    def pattern(self, op, x, w, bias, multiplier, shift):
        acc = op.Add(op.MatMulInteger(x, w), bias)
        return op.Requantize(
            acc, multiplier, shift, _domain=DOMAIN, _allow_other_attributes=True, _outputs=["requant_out"]
        )

    def check(self, context, x, w, bias, multiplier, shift, requant_out, **_) -> MatchResult:
        result = MatchResult()
        if not _int8_input(x):
            return result.fail(f"the input is {x.dtype}, not int8 or int16")
        weight, b = const_array(w), const_array(bias)
        if weight is None or weight.ndim != 2 or weight.dtype != np.int8:
            return result.fail("MatMulInteger weight is not a constant int8 matrix")
        if b is None or b.dtype != np.int32 or b.size != weight.shape[1]:
            return result.fail("the added tensor is not a constant int32 bias of width N")
        if const_array(multiplier) is None or const_array(shift) is None:
            return result.fail("multiplier/shift are not constant")
        node = requant_out.producer()
        axis = node.attributes.get_int("axis", 1)
        rank = len(x.shape) if x.shape is not None else None
        if const_array(multiplier).size > 1 and axis != -1 and (rank is None or axis != rank - 1):  # type: ignore[union-attr]
            return result.fail(f"per-channel requantize on axis {axis} is not the output-feature axis")
        return result

    def rewrite(self, op, x, w, bias, multiplier, shift, requant_out, row_exponent=None, **_):
        weight, b = const_array(w), const_array(bias)
        assert weight is not None and b is not None
        w_t = _fresh(op, aligned_copy(weight.T), requant_out, "weight_nk")  # the TVM build adopts it, no copy
        b_vec = _fresh(op, b.reshape(-1).astype(np.int32), requant_out, "fused_bias")
        rows = [row_exponent] if row_exponent is not None else []
        return op.QGemm(x, w_t, b_vec, multiplier, shift, *rows, _domain=DOMAIN, **_epilogue(requant_out))


class _FuseMatMulIntegerRows(_FuseMatMulInteger):
    """The same with a row exponent: ``Requantize(MatMulInteger(x, W) + b, row_exponent=e) -> QGemm(..., e)``."""

    def pattern(self, op, x, w, bias, multiplier, shift, row_exponent):  # type: ignore[override]
        acc = op.Add(op.MatMulInteger(x, w), bias)
        return op.Requantize(
            acc, multiplier, shift, row_exponent, _domain=DOMAIN, _allow_other_attributes=True,
            _outputs=["requant_out"],
        )  # fmt: skip


class _FuseConvInteger(RewriteRuleClassBase):
    """``Requantize(ConvInteger(x, W) + b, axis=1) -> QConv(x, W, b)``."""

    def pattern(self, op, x, w, bias, multiplier, shift):
        acc = op.Add(op.ConvInteger(x, w, _allow_other_attributes=True, _outputs=["conv_out"]), bias)
        return op.Requantize(
            acc, multiplier, shift, _domain=DOMAIN, _allow_other_attributes=True, _outputs=["requant_out"]
        )

    def check(self, context, x, w, bias, multiplier, shift, conv_out, requant_out, **_) -> MatchResult:
        result = MatchResult()
        if not _int8_input(x):
            return result.fail(f"the input is {x.dtype}, not int8 or int16")
        weight, b = const_array(w), const_array(bias)
        if weight is None or weight.ndim != 4 or weight.dtype != np.int8:
            return result.fail("ConvInteger weight is not a constant int8 4-D tensor")
        if b is None or b.dtype != np.int32 or b.size != weight.shape[0]:
            return result.fail("the added tensor is not a constant int32 bias per output channel")
        if const_array(multiplier) is None or const_array(shift) is None:
            return result.fail("multiplier/shift are not constant")
        if requant_out.producer().attributes.get_int("axis", 1) != 1 and const_array(multiplier).size > 1:  # type: ignore[union-attr]
            return result.fail("per-channel requantize is not on the channel axis")
        if conv_out.producer().attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return result.fail("auto_pad must be resolved to explicit pads")
        return result

    def rewrite(self, op, x, w, bias, multiplier, shift, conv_out, requant_out, **_):
        conv = conv_out.producer()
        b = const_array(bias)
        assert b is not None
        b_vec = _fresh(op, b.reshape(-1).astype(np.int32), requant_out, "fused_bias")
        attrs = {
            "strides": list(conv.attributes.get_ints("strides", [1, 1])),
            "pads": list(conv.attributes.get_ints("pads", [0, 0, 0, 0])),
            "dilations": list(conv.attributes.get_ints("dilations", [1, 1])),
            "group": conv.attributes.get_int("group", 1),
        }
        return op.QConv(x, w, b_vec, multiplier, shift, _domain=DOMAIN, **attrs, **_epilogue(requant_out))


class FuseIntegerLinearPass(RewritePass):
    """Integer product + bias + requantize -> ``qcompiler.QGemm`` / ``qcompiler.QConv`` (one kernel each)."""

    def __init__(self) -> None:
        super().__init__(
            RewriteRuleSet([_FuseMatMulInteger().rule(), _FuseMatMulIntegerRows().rule(), _FuseConvInteger().rule()])
        )
