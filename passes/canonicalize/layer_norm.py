"""Fuse decomposed LayerNorm (``(x - mean) / Sqrt(Var + eps) * g + b`` over the last axis, as Paddle2ONNX and
older exporters write it) into ONNX ``LayerNormalization``, with onnxscript's own fusion rules.

Decomposed, the integer path would quantize each step (the deviation, its square, the variance, the root, the
quotient) or keep them as float islands; fused, the norm is one ``IntLayerNorm`` with one output rounding.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, pattern
from onnxscript.rewriter.rules.fusion._layer_norm import LayerNormBiasFusion, LayerNormFusion

from qcompiler.ir.graph import const_array


class _LayerNormFusion(LayerNormFusion):
    """onnxscript's rule, matching ``ReduceMean`` however its attributes are spelled: with ``keepdims`` left at
    its default (1) as well as written out, over ``axes = [-1]`` or ``[rank - 1]``."""

    def pattern(self, op, x, scale, epsilon, axes, axes2):
        mean = op.ReduceMean(x, axes, _outputs=["mean"])
        deviation = op.Sub(x, mean)
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2)])
        variance = op.ReduceMean(squared, axes2, _outputs=["variance"])
        std_dev = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue([op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)])
        return op.Mul(normalized, scale)

    def check(self, context, x, epsilon, axes, axes2, mean, variance, **_) -> MatchResult:
        result = MatchResult()
        rank = len(x.shape) if x.shape is not None else None
        for reduced, output in ((axes, mean), (axes2, variance)):
            if output.producer().attributes.get_int("keepdims", 1) != 1:
                return result.fail("ReduceMean does not keep the reduced axis")
            values = const_array(reduced)
            if values is None or values.reshape(-1).tolist() not in ([-1], [rank - 1 if rank else -1]):
                return result.fail(f"ReduceMean is not over the last axis alone (axes {values})")
        return super().check(context, x, epsilon)


_RULES = [_LayerNormFusion.rule(), LayerNormBiasFusion.rule()]


class FuseLayerNormPass(ir.passes.InPlacePass):
    """Every decomposed LayerNorm over the last axis (with its gain, and its bias when an Add follows) becomes one
    ``LayerNormalization`` node."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return RewritePass(_RULES)(model)
