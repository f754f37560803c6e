"""Small graph queries and edits on ``onnx_ir`` shared by the passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

#: metadata key of a node kept in float on purpose (``compile(..., integer_only=False)``); its value is the reason
#: the integer path refused the node
FLOAT_ISLAND = "qcompiler.float_island"


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (an initializer), or None if it is computed at run time."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used by any input, initializer or node output of ``graph``."""
    taken = _names(graph)
    if base not in taken:
        return base
    index = 1
    while f"{base}_{index}" in taken:
        index += 1
    return f"{base}_{index}"


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name}
    names.update(graph.initializers.keys())
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` and return its value; ``dtype`` stores it
    as another element type (``INT4`` codes given as int8)."""
    name = unique_name(graph, base)
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # np.ascontiguousarray would turn a 0-d scale into shape [1]
        array = array.copy(order="C")
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes that read ``value``."""
    seen: dict[int, ir.Node] = {}
    for node, _ in value.uses():
        seen[id(node)] = node
    return list(seen.values())


def is_graph_output(graph: ir.Graph, value: ir.Value) -> bool:
    return any(out is value for out in graph.outputs)


def node_label(node: ir.Node) -> str:
    """How errors name a node: its name, or its op and first output when it has none."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"<{node.op_type} -> {first}>"
