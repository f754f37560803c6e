"""Fold norm gains and shifts into the linears that read the norm (REFERENCES.md section 2).

``y = (n * g + beta) W + b = n (diag(g) W) + (b + beta W)``: the norm becomes weightless (gain 1, shift 0), which a
rotation of its input commutes with (an RMSNorm over the last axis). Exact in real arithmetic; float32 rounding
only. A norm is left alone, with the reason logged and kept in ``skipped``, when anything but linears with
constant weights reads it, or when it has a shift and a reader has no bias to absorb it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import node_label
from qcompiler.ir.regions import norm_regions
from qcompiler.passes.transform.weights import scale_input, set_input_constant, shift_input

logger = logging.getLogger(__name__)


class FoldNormGainsPass(ir.passes.InPlacePass):
    """Every norm whose readers are all linears gets gain 1 and shift 0; the readers absorb them."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, list[str]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.skipped = {}
        modified = False
        for region in norm_regions(graph):
            if region.weightless:
                continue
            blockers = list(region.blockers)
            if not region.readers:
                blockers.append("no linear reads it")
            shift = region.shift
            if shift is not None and np.any(shift):
                blockers += [f"{r.label} has no bias to absorb the shift" for r in region.readers if r.bias is None]
            if blockers:
                self.skipped[node_label(region.norm)] = blockers
                logger.info("fold-norm-gains: %s kept its gain: %s", node_label(region.norm), "; ".join(blockers))
                continue
            gain = region.gain
            for reader in region.readers:  # the shift first: it uses the weight before the gain is folded in
                if shift is not None and np.any(shift):
                    shift_input(graph, reader, shift)
                if gain is not None:
                    scale_input(graph, reader, gain)
            norm = region.norm
            if gain is not None:
                set_input_constant(graph, norm, 1, np.ones_like(gain))
            if shift is not None:
                set_input_constant(graph, norm, 2, np.zeros_like(shift))
            modified = True
        return ir.passes.PassResult(model, modified=modified)
