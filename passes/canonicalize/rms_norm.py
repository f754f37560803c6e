"""Fuse decomposed RMSNorm (``x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * g``, as torch's exporter writes
Llama's RMSNorm) into ONNX ``RMSNormalization`` (opset 23), with onnxscript's own fusion rules."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewritePass, pattern
from onnxscript.rewriter.rules.fusion._rms_normalization import RmsNormFusion

from qcompiler.ir.graph import const_array

RMS_NORM_OPSET = 23  # RMSNormalization's first opset


class _RmsNormFusion(RmsNormFusion):
    """onnxscript's rule, matching ``ReduceMean`` however its attributes are spelled: with ``keepdims`` left at
    its default (1) as well as written out, and over ``axes = [-1]`` or ``[rank - 1]``."""

    def pattern(self, op, x, scale, epsilon, compute_dtype, target_dtype, axes):
        x = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
        mean_square = op.ReduceMean(op.Pow(x, 2.0), axes, _outputs=["mean_square"])
        normalized = op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon))))
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        return op.Mul(normalized, scale) if self._mul_order else op.Mul(scale, normalized)

    def check(self, op, x, scale, epsilon, compute_dtype, target_dtype, axes, mean_square, **_) -> MatchResult:
        result = MatchResult()
        reduce = mean_square.producer()
        if reduce.attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean does not keep the reduced axis")
        rank = len(x.shape) if x.shape is not None else None
        reduced = const_array(axes)
        if reduced is None or reduced.reshape(-1).tolist() not in ([-1], [rank - 1 if rank else -1]):
            return result.fail(f"ReduceMean is not over the last axis alone (axes {reduced})")
        return super().check(op, x, scale, epsilon, compute_dtype, target_dtype)


_RULES = [_RmsNormFusion.rule("RmsNormFusion1", mul_order=True), _RmsNormFusion.rule("RmsNormFusion2", mul_order=False)]


class FuseRMSNormPass(ir.passes.InPlacePass):
    """Every decomposed RMSNorm becomes one ``RMSNormalization`` node; the default opset is raised to 23 when
    one is fused (opsets 22 and 23 only added types to the ops this project uses, so the rest of the graph
    means the same)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = RewritePass(_RULES)(model)
        if not result.modified:
            return ir.passes.PassResult(model, modified=False)
        if model.opset_imports.get("", 0) < RMS_NORM_OPSET:
            model.opset_imports[""] = RMS_NORM_OPSET
        return ir.passes.PassResult(model, modified=True)
