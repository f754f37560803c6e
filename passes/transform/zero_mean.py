"""LayerNorm to RMSNorm by keeping the residual stream zero-mean (REFERENCES.md section 2; QuaRot, SliceGPT).

``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) g + b``. If every row of the stream already has mean 0, then
``var(x) = mean(x^2)`` and ``LN(x) = RMSNorm(x) g + b``, which commutes with a rotation. The stream is a sum of
what its writers write, so it is zero-mean when every writer is: a linear writer ``W <- W C``, ``b <- b C`` and
an embedding table ``E <- E C`` with the centering matrix ``C = I - 1 1^T / n`` (each output row minus its
mean). Exact when nothing else sees the stream's mean: every norm on it is a LayerNormalization over the last
axis (mean-invariant: ``LN(x - m) = LN(x)``), no linear reads it directly, and its writers are all linears with
constant weights or embedding lookups. An RMSNorm model is left alone (its norms see the mean: centering would
change them), as is a post-norm model (the stream is the norms' output, which linears read directly).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, node_label
from qcompiler.ir.regions import residual_streams
from qcompiler.passes.canonicalize.rms_norm import RMS_NORM_OPSET
from qcompiler.passes.transform.weights import rotate_output, set_input_constant

logger = logging.getLogger(__name__)


def _blockers(stream) -> list[str]:
    blockers = list(stream.structure_blockers)
    if stream.readers:
        blockers.append(f"{stream.readers[0].label} reads the stream directly (it would see the mean removed)")
    for region in stream.norms:
        norm = region.norm
        if norm.op_type != "LayerNormalization":
            blockers.append(f"{node_label(norm)} ({norm.op_type}) sees the stream's mean")
            continue
        shape = norm.inputs[0].shape if norm.inputs[0] is not None else None
        axis = norm.attributes.get_int("axis", -1)
        if shape is None or axis not in (-1, len(shape) - 1):
            blockers.append(f"{node_label(norm)} normalises more than the last axis")
    return blockers


class LayerNormToRMSNormPass(ir.passes.InPlacePass):
    """Make every qualifying residual stream zero-mean and its LayerNorms RMSNorms (gain and shift kept: run
    ``fold-norm-gains`` before or after). Streams that do not qualify are left alone with the reasons in
    ``skipped``. Raises the default opset to 23 (RMSNormalization) when it changes anything."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, list[str]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.skipped = {}
        modified = False
        for stream in residual_streams(graph):
            if not any(r.norm.op_type == "LayerNormalization" for r in stream.norms):
                continue
            where = f"residual stream through {node_label(stream.norms[0].norm)}"
            blockers = _blockers(stream)
            if blockers:
                self.skipped[where] = blockers
                logger.info("layernorm-to-rmsnorm: %s skipped: %s", where, "; ".join(blockers))
                continue
            center = np.eye(stream.hidden) - 1.0 / stream.hidden
            for writer in stream.writers:
                rotate_output(graph, writer, center)
            for gather in stream.embeddings:
                table = gather.inputs[0].const_value.numpy()
                centered = table.astype(np.float64) - table.astype(np.float64).mean(axis=1, keepdims=True)
                set_input_constant(graph, gather, 0, centered.astype(table.dtype))
            for region in stream.norms:
                _replace_layer_norm(graph, region.norm, stream.hidden)
            modified = True
        if modified and model.opset_imports.get("", 0) < RMS_NORM_OPSET:
            model.opset_imports[""] = RMS_NORM_OPSET
        return ir.passes.PassResult(model, modified=modified)


def _replace_layer_norm(graph: ir.Graph, norm: ir.Node, hidden: int) -> None:
    """``LayerNormalization(x, g, b)`` -> ``RMSNormalization(x, g)`` (+ ``b``), same epsilon, same output value."""
    x = norm.inputs[0]
    gain = norm.inputs[1] if len(norm.inputs) > 1 and norm.inputs[1] is not None else None
    dtype = x.dtype.numpy() if x is not None and x.dtype is not None else np.float32
    if gain is None:
        gain = add_initializer(graph, f"{norm.name or 'norm'}_gain", np.ones(hidden, dtype))
    epsilon = norm.attributes.get_float("epsilon", 1e-5)
    rms = ir.node("RMSNormalization", [x, gain], attributes={"axis": -1, "epsilon": epsilon}, name=norm.name)
    shift = norm.inputs[2] if len(norm.inputs) > 2 else None
    shift_array = shift.const_value.numpy() if shift is not None and shift.const_value is not None else None
    if shift_array is not None and not np.any(shift_array):
        shift = None  # a zero shift (after fold-norm-gains): nothing to add
    out = norm.outputs[0]
    new_nodes = [rms]
    result = rms.outputs[0]
    if shift is not None:
        add = ir.node("Add", [rms.outputs[0], shift])
        new_nodes.append(add)
        result = add.outputs[0]
    result.dtype, result.shape = out.dtype, out.shape
    graph.insert_before(norm, new_nodes)
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    name = out.name
    graph.remove(norm, safe=True)
    result.name = name
