"""A scalar factor on the right operand of an activation product moves to its left operand.

PyTorch's attention decomposition scales both operands of ``Q K^T`` by ``sqrt(1 / sqrt(d))``: ``(q c) (k^T c)``.
In a decode step the right operand is the whole key cache (``[heads, d, T]`` against the query's one row), and
its scale is a requantize over every cached key per step, which also keeps the kernel from reading the cache in
place. ``a (b c) = (a c) b`` exactly in real arithmetic; moved left, the factor joins the query's own scalar (one
constant) or becomes a Mul on the query, which the quantizer folds into the query's requantize. Float results
change only by rounding (checked by the pass's property test).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array, consumers, is_graph_output, unique_name

#: ops whose one constant scalar input is a factor: op -> the factor from the constant
_FACTORS = {"Mul": lambda c: c, "Div": lambda c: 1.0 / c}


def _scalar_factor(value: ir.Value, graph: ir.Graph) -> tuple[ir.Node, ir.Value, float] | None:
    """``(node, x, c)`` when ``value = x * c`` (or ``x / c``) for a constant scalar ``c``, read only here."""
    node = value.producer()
    if node is None or node.op_type not in _FACTORS or len(node.inputs) != 2:
        return None
    if len(consumers(value)) != 1 or is_graph_output(graph, value):
        return None
    x, constant = node.inputs
    array = const_array(constant)
    if array is None and node.op_type == "Mul":
        x, constant = constant, x
        array = const_array(constant)
    if x is None or array is None or array.size != 1 or const_array(x) is not None:
        return None
    if not np.issubdtype(array.dtype, np.floating) or float(array.reshape(())) == 0.0:
        return None
    return node, x, float(_FACTORS[node.op_type](float(array.reshape(()))))


class MoveProductScalarsLeftPass(ir.passes.InPlacePass):
    """``MatMul(a, b * c) -> MatMul(a * c, b)`` for activations ``a``, ``b`` and a constant scalar ``c``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or len(node.inputs) != 2:
                continue
            left, right = node.inputs
            if left is None or right is None or const_array(left) is not None or const_array(right) is not None:
                continue
            found = _scalar_factor(right, graph)
            if found is None:
                continue
            scale_node, source, factor = found
            node.replace_input_with(1, source)
            graph.remove(scale_node, safe=True)
            left_scale = _scalar_factor(left, graph)
            if left_scale is not None:  # the query's own scalar: one constant for both
                left_node, left_source, left_factor = left_scale
                own = const_array(left_node.inputs[1] if left_node.inputs[0] is left_source else left_node.inputs[0])
                assert own is not None
                merged = add_initializer(graph, f"{left_node.name}_scale", np.asarray(left_factor * factor, own.dtype))
                scaled = ir.node("Mul", [left_source, merged], name=unique_name(graph, f"{left_node.name}_moved"))
                graph.insert_before(left_node, scaled)
                like = left_source
                left_node.outputs[0].replace_all_uses_with(scaled.outputs[0])
                graph.remove(left_node, safe=True)
            else:
                constant = add_initializer(graph, f"{node.name}_scale", np.asarray(factor, dtype=np.float32))
                scaled = ir.node("Mul", [left, constant], name=unique_name(graph, f"{node.name}_left_scale"))
                graph.insert_before(node, scaled)
                node.replace_input_with(0, scaled.outputs[0])
                like = left
            if like.dtype is not None:
                scaled.outputs[0].dtype, scaled.outputs[0].shape = like.dtype, like.shape
            modified = True
        return ir.passes.PassResult(model, modified)
