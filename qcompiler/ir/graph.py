"""Small graph queries and edits on ``onnx_ir`` shared by the passes."""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

#: metadata key of a node kept in float on purpose (``compile(..., integer_only=False)``); its value is the reason
#: the integer path refused the node
FLOAT_ISLAND = "qcompiler.float_island"
#: metadata key of the QuantizeLinear of a graph input that holds what the graph itself wrote (a KV cache): the
#: largest ``|q|`` it can hold (the clamp of the values written), which the lowering's product bounds read
INPUT_LEVEL_PROP = "qcompiler.input_level"
#: metadata key of a graph with symbolic dimensions: a JSON map of each dimension symbol to its largest value
#: (a sequence length up to the model's context), which bounds proofs read (an int32 sum over a symbolic length)
DIM_BOUNDS = "qcompiler.dim_bounds"


def set_dim_bounds(graph: ir.Graph, bounds: Mapping[str, int]) -> None:
    """Record the largest value of each symbolic dimension of ``graph`` (:data:`DIM_BOUNDS`)."""
    graph.metadata_props[DIM_BOUNDS] = json.dumps({str(k): int(v) for k, v in bounds.items()}, sort_keys=True)


def _expression(dim: object) -> Any:
    """The sympy expression of a symbolic dimension (``s1``, ``s1 + 16``: torch.export's text), or None."""
    text = getattr(dim, "value", None)
    if isinstance(dim, int) or not isinstance(text, str):
        return None
    import sympy

    try:
        return sympy.sympify(text)
    except (sympy.SympifyError, TypeError, SyntaxError):
        return None


def _dim_at(dim: object, values: Mapping[str, int]) -> object:
    """``dim`` with its symbols replaced by ``values``: an int when that leaves a number, else ``dim``."""
    expression = _expression(dim)
    if expression is None:
        return dim
    value = expression.subs({s: values[str(s)] for s in expression.free_symbols if str(s) in values})
    return int(value) if value.is_number and value.is_integer else dim


def specialize_dims(model: ir.Model, values: Mapping[str, int]) -> ir.Model:
    """A copy of ``model`` (tensors shared) for one value of each symbolic dimension (``{"s1": 1}``): every shape
    that torch.export wrote as an expression of the symbols becomes static, and the shape arithmetic that read
    them (Shape, Gather, Concat of dims) is folded to constants, which is the static graph a backend builds."""
    import onnxscript.optimizer

    copy = model.clone()
    values_ = [*copy.graph.inputs, *(v for node in copy.graph for v in node.outputs)]
    for value in values_:
        if value.shape is not None:
            value.shape = ir.Shape([_dim_at(d, values) for d in value.shape])
    onnxscript.optimizer.fold_constants(copy)
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    if DIM_BOUNDS in copy.graph.metadata_props:
        del copy.graph.metadata_props[DIM_BOUNDS]
    return copy


def dim_upper_bound(graph: ir.Graph | None, dim: object) -> int | None:
    """The largest value ``dim`` takes: itself when static; for a symbolic dimension (``s1`` or an expression of
    symbols such as ``s1 + 16``, as torch.export writes them) its value at every symbol's recorded bound, when all
    are bounded and the expression grows with each (sums and products of positive terms), else None."""
    if isinstance(dim, int):
        return dim
    expression = _expression(dim)
    if graph is None or expression is None or DIM_BOUNDS not in graph.metadata_props:
        return None
    import sympy

    bounds = json.loads(graph.metadata_props[DIM_BOUNDS])
    symbols = expression.free_symbols
    if not all(str(s) in bounds for s in symbols):
        return None
    at_bounds = {s: bounds[str(s)] for s in symbols}
    if any(sympy.diff(expression, s).subs(at_bounds) < 0 for s in symbols):
        return None
    value = expression.subs(at_bounds)
    return int(value) if value.is_integer else None


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (an initializer), or None if it is computed at run time."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


#: id(graph) -> the names of the graph when its :func:`naming` block began, plus every name handed out since
_SCOPES: dict[int, tuple[set[str], list[str]]] = {}


@contextlib.contextmanager
def naming(graph: ir.Graph) -> Iterator[None]:
    """A block of many :func:`unique_name` calls on ``graph`` (a pass adding thousands of initializers): the
    graph's names are read once, at the start, instead of at every call (which made a pass quadratic in the
    graph's size). A name the block hands out is checked against those and against the names it handed out
    before; one that a node renamed inside the block took meanwhile is found by an exact scan at the end and the
    handed-out initializer renamed, so the graph leaves the block with unique names either way."""
    if id(graph) in _SCOPES:  # nested: the outer block already reads the names once
        yield
        return
    _SCOPES[id(graph)] = (_names(graph), [])
    try:
        yield
    finally:
        _, handed_out = _SCOPES.pop(id(graph))
        _rename_collisions(graph, handed_out)


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used by any input, initializer or node output of ``graph``."""
    scope = _SCOPES.get(id(graph))
    taken = scope[0] if scope is not None else _names(graph)
    name = base
    index = 0
    while name in taken or name in graph.initializers:  # the second: one registered by other means meanwhile
        index += 1
        name = f"{base}_{index}"
    if scope is not None:
        scope[0].add(name)
        scope[1].append(name)
    return name


def _rename_collisions(graph: ir.Graph, handed_out: list[str]) -> None:
    """Give a fresh name to every initializer handed out in a :func:`naming` block whose name another value of
    ``graph`` also carries (one renamed inside the block, after the names were read)."""
    owners: dict[str, int] = {}
    for value in graph.inputs:
        if value.name:
            owners[value.name] = owners.get(value.name, 0) + 1
    for node in graph:
        for value in node.outputs:
            if value.name:
                owners[value.name] = owners.get(value.name, 0) + 1
    for name in handed_out:
        value = graph.initializers.get(name)
        if value is not None and owners.get(name, 0) > 0:
            value.name = unique_name(graph, name)


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name}
    names.update(graph.initializers.keys())
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def release_removed_values(model: ir.Model) -> int:
    """Drop the values a graph no longer holds from onnx_ir's input and output bookkeeping; returns how many.

    onnx_ir 1.1's ``GraphInputs`` and ``GraphOutputs`` count their values in a ``Counter`` and only decrement it,
    so a value they saw removed (with count 0 or below) stays a key forever, and with it the tensor of a removed
    initializer: every weight a pass replaced stayed in memory (measured on a 1.1 B Llama: its int8 codes, 1 GB,
    held after lowering had replaced them). The pipeline calls this after every pass."""
    released = 0
    for graph in model.graphs():
        for container in (graph.inputs, graph.outputs):
            counter = getattr(container, "_ref_counter", None)
            if not isinstance(counter, collections.Counter):
                continue
            dead = [value for value, count in counter.items() if count <= 0]
            for value in dead:
                del counter[value]
            released += len(dead)
    return released


#: the alignment TVM needs to adopt an array's memory as a constant (DLPack; else it copies): 64 bytes
ALIGNMENT = 64


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """``array`` copied into a C-contiguous buffer whose start is :data:`ALIGNMENT`-aligned, so that the TVM
    backend takes it as a constant without another copy (numpy aligns large buffers to 16 bytes)."""
    buffer = np.empty(array.nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    out = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


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
