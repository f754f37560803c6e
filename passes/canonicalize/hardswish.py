"""Fuse decomposed hard activations into one op, with onnxscript's own rules: ``x * Clip(x + 3, 0, 6) / 6`` into
``HardSwish`` and ``Clip(x + 3, 0, 6) / 6`` into ``HardSigmoid(alpha=1/6, beta=0.5)`` (PaddleOCR's and other
exporters write MobileNetV3's activations so), ``HardSigmoid(x) * x`` into ``HardSwish``.

Float-exact up to float32 rounding. It matters to quantization: decomposed, the chain's Add, Clip, Mul and Div
outputs are each rounded to int8 (four roundings, the product's at a step set by its largest value); fused, the
activation is one lookup table from its input's levels to its output's (passes/lower/lookup.py), one rounding.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.common import fuse_hardswish_rules


class FuseHardSwishPass(ir.passes.InPlacePass):
    """Every decomposed HardSwish and HardSigmoid (MobileNetV3's form) becomes one node."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return RewritePass(fuse_hardswish_rules())(model)
