"""Fuse decomposed RMSNorm (``x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * g``, as torch's exporter writes
Llama's RMSNorm) into ONNX ``RMSNormalization`` (opset 23), with onnxscript's own fusion rules."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_rules

RMS_NORM_OPSET = 23  # RMSNormalization's first opset


class FuseRMSNormPass(ir.passes.InPlacePass):
    """Every decomposed RMSNorm becomes one ``RMSNormalization`` node; the default opset is raised to 23 when
    one is fused (opsets 22 and 23 only added types to the ops this project uses, so the rest of the graph
    means the same)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = RewritePass(rms_normalization_rules)(model)
        if not result.modified:
            return ir.passes.PassResult(model, modified=False)
        if model.opset_imports.get("", 0) < RMS_NORM_OPSET:
            model.opset_imports[""] = RMS_NORM_OPSET
        return ir.passes.PassResult(model, modified=True)
