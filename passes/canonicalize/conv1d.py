"""A 1-D convolution becomes a 2-D one over a height of 1, the form the integer convolution kernels take.

``Conv1d(x[N, C, L], W[O, C/g, k]) = Squeeze(Conv2d(Unsqueeze(x, 2)[N, C, 1, L], W[O, C/g, 1, k]), 2)`` with the
pads, strides and dilations moved to the width axis (height: no padding, stride 1, dilation 1).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array


class ConvertConv1dToConv2dPass(ir.passes.InPlacePass):
    """``Conv`` on ``[N, C, L]`` with a constant ``[O, C/g, k]`` weight -> Unsqueeze, 2-D Conv, Squeeze."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            weight = const_array(node.inputs[1])
            x = node.inputs[0]
            if weight is None or weight.ndim != 3 or x is None:
                continue
            if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                continue  # SAME padding depends on the input length; left for the lowering to refuse by name
            base = node.outputs[0].name or "conv1d"
            axis = add_initializer(graph, f"{base}_height_axis", np.array([2], np.int64))
            widened = ir.node("Unsqueeze", [x, axis])
            attributes: dict[str, object] = {}
            pads = node.attributes.get_ints("pads", [0, 0])
            attributes["pads"] = [0, int(pads[0]), 0, int(pads[1])]
            attributes["strides"] = [1, int(node.attributes.get_ints("strides", [1])[0])]
            attributes["dilations"] = [1, int(node.attributes.get_ints("dilations", [1])[0])]
            attributes["kernel_shape"] = [1, int(weight.shape[2])]
            attributes["group"] = node.attributes.get_int("group", 1)
            w2d = add_initializer(graph, f"{base}_weight_2d", weight[:, :, None, :])
            inputs = [widened.outputs[0], w2d, *node.inputs[2:]]
            conv = ir.node("Conv", inputs, attributes=attributes)
            narrowed = ir.node("Squeeze", [conv.outputs[0], axis])
            if x.shape is not None and len(x.shape) == 3:
                widened.outputs[0].shape = ir.Shape([x.shape[0], x.shape[1], 1, x.shape[2]])
            widened.outputs[0].dtype = conv.outputs[0].dtype = narrowed.outputs[0].dtype = x.dtype
            narrowed.outputs[0].shape = node.outputs[0].shape
            graph.insert_before(node, [widened, conv, narrowed])
            node.outputs[0].replace_all_uses_with(narrowed.outputs[0], replace_graph_outputs=True)
            narrowed.outputs[0].name = base
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
