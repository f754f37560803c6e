"""InstanceNormalization becomes a LayerNormalization over the flattened spatial axes, the integer path's norm.

``IN(x)[n, c] = (x[n, c] - mean) / sqrt(var + eps) * scale[c] + bias[c]`` with the statistics over the spatial axes
of ``x[N, C, *S]``; a LayerNormalization over the last axis of ``x`` reshaped to ``[N, C, prod(S)]`` computes the
same statistics with the same epsilon (both add it to the variance). The per-channel affine then follows as a
``Mul`` and ``Add`` by ``[C, 1, ..., 1]`` constants (left out where they are the identity), or, with one channel
(torch's GroupNorm with one group exports as exactly that), as the LayerNormalization's own gain and bias.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array, node_label

logger = logging.getLogger(__name__)


def _skip_reason(node: ir.Node) -> str | None:
    """Why ``node`` cannot become a LayerNormalization here, or None."""
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) < 3:
        return "its input's rank is unknown or below 3"
    if not all(isinstance(d, int) for d in x.shape[2:]):
        return "its spatial dimensions are not static"
    if len(node.inputs) < 3 or const_array(node.inputs[1]) is None or const_array(node.inputs[2]) is None:
        return "its scale and bias are not constants"
    return None


class ConvertInstanceNormToLayerNormPass(ir.passes.InPlacePass):
    """``InstanceNormalization(x, s, b) -> Reshape(LayerNorm(Reshape(x, [N, C, L]))) * s[C, 1..] + b[C, 1..]``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            reason = _skip_reason(node)
            if reason is not None:
                logger.info("instance norm %s left alone: %s", node_label(node), reason)
                continue
            self._rewrite(graph, node)
            modified = True
        return ir.passes.PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> None:
        x = node.inputs[0]
        assert x is not None and x.shape is not None
        scale, bias = const_array(node.inputs[1]), const_array(node.inputs[2])
        assert scale is not None and bias is not None
        spatial = [int(d) for d in x.shape[2:]]
        length = int(np.prod(spatial, dtype=np.int64))
        dtype = scale.dtype
        scale, bias = scale.reshape(-1), bias.reshape(-1)
        base = node.outputs[0].name or "instance_norm"
        one_channel = scale.size == 1  # the affine is the LayerNormalization's own
        gain = np.full(length, scale[0] if one_channel else 1.0, dtype)
        offset = np.full(length, bias[0] if one_channel else 0.0, dtype)
        flat_shape = ir.Shape([x.shape[0], x.shape[1], length])
        nodes: list[ir.Node] = []
        current = x
        if len(spatial) > 1:
            target = add_initializer(graph, f"{base}_flat_shape", np.array([0, 0, -1], np.int64))
            nodes.append(ir.node("Reshape", [x, target]))
            current = nodes[-1].outputs[0]
            current.dtype, current.shape = x.dtype, flat_shape
        norm = ir.node(
            "LayerNormalization",
            [current, add_initializer(graph, f"{base}_gain", gain), add_initializer(graph, f"{base}_offset", offset)],
            attributes={"axis": -1, "epsilon": node.attributes.get_float("epsilon", 1e-5)},
        )
        nodes.append(norm)
        current = norm.outputs[0]
        current.dtype, current.shape = x.dtype, flat_shape
        if len(spatial) > 1:
            target = add_initializer(graph, f"{base}_shape", np.array([0, 0, *spatial], np.int64))
            nodes.append(ir.node("Reshape", [current, target]))
            current = nodes[-1].outputs[0]
        channel_shape = [-1] + [1] * len(spatial)
        if not one_channel and not np.all(scale == 1):
            factor = add_initializer(graph, f"{base}_scale", scale.reshape(channel_shape))
            nodes.append(ir.node("Mul", [current, factor]))
            current = nodes[-1].outputs[0]
        if not one_channel and np.any(bias != 0):
            addend = add_initializer(graph, f"{base}_bias", bias.reshape(channel_shape))
            nodes.append(ir.node("Add", [current, addend]))
            current = nodes[-1].outputs[0]
        for later in nodes[nodes.index(norm) + 1 :]:
            later.outputs[0].dtype, later.outputs[0].shape = x.dtype, x.shape
        graph.insert_before(node, nodes)
        node.outputs[0].replace_all_uses_with(current, replace_graph_outputs=True)
        current.name = base
        graph.remove(node, safe=True)
