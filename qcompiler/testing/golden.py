"""Name-free structural comparison of ONNX graphs, for golden before/after tests of passes.

A pass's golden test writes the graph it expects in ONNX text and compares it with what the pass produced.
Names must not matter (passes invent them), so both graphs are first brought to a canonical form:

- graph inputs become ``%in0, %in1, ...`` in declaration order;
- constants (initializers and tensor attributes) become ``$c0, $c1, ...`` by first use; two constants with the
  same dtype, shape and bytes are one constant, and their values are compared apart, with a tolerance;
- nodes are listed in a topological walk that takes, among the nodes whose inputs are all defined, the one
  with the smallest (domain, op, inputs, attributes) key, so that independent nodes may come in any order;
  node ``k``'s outputs become ``%k.0, %k.1, ...``.

Initializers that no node reads do not appear (``remove-unused`` drops them). Two nodes that tie on the key
are taken in graph order; only a graph with two such twins feeding different consumers could then compare
unequal to an isomorphic one. Subgraph attributes (If, Loop) are not supported.
"""

from __future__ import annotations

import dataclasses
import difflib

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

__all__ = ["CanonicalGraph", "assert_same_structure", "canonical_form"]


@dataclasses.dataclass(frozen=True)
class CanonicalGraph:
    """A graph with its names replaced by positions: compare ``lines`` (which hold the constants' dtypes and
    shapes) exactly and ``constants`` numerically."""

    lines: tuple[str, ...]
    constants: tuple[np.ndarray, ...]

    def text(self) -> str:
        """The listing: one line per opset, input, node, output and constant, then the constants' values."""
        constants = [f"$c{i} = {_preview(array)}" for i, array in enumerate(self.constants)]
        return "\n".join([*self.lines, *constants])


def canonical_form(model: ir.Model | onnx.ModelProto | str) -> CanonicalGraph:
    """The name-free form of ``model``'s main graph (see the module docstring); ``str`` is ONNX text."""
    model = _as_ir(model)
    graph = model.graph
    refs: dict[int, str] = {}
    lines = [f"opset {domain or 'ai.onnx'} {version}" for domain, version in sorted(model.opset_imports.items())]
    for index, value in enumerate(graph.inputs):
        refs[id(value)] = f"%in{index}"
        lines.append(f"input %in{index}: {_value_type(value)}")
    constants: list[np.ndarray] = []
    constant_refs: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def constant_ref(array: np.ndarray) -> str:
        key = (array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
        if key not in constant_refs:
            constant_refs[key] = f"$c{len(constants)}"
            constants.append(array)
        return constant_refs[key]

    def input_ref(value: ir.Value | None, resolve: bool) -> str:
        if value is None:
            return "_"
        if id(value) in refs:
            return refs[id(value)]
        if _is_constant(value):
            array = value.const_value.numpy()
            return constant_ref(array) if resolve else f"${_describe(array)}"
        raise AssertionError(f"value {value.name!r} is read but never defined: the graph is not well formed")

    def attribute_text(attr: ir.Attr, resolve: bool) -> str:
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise NotImplementedError(f"attribute {attr.name}: subgraphs are not supported by canonical_form")
        if attr.type == ir.AttributeType.TENSOR:
            array = attr.as_tensor().numpy()
            return f"{attr.name}={constant_ref(array) if resolve else '$' + _describe(array)}"
        if attr.type == ir.AttributeType.TENSORS:
            arrays = [t.numpy() for t in attr.as_tensors()]
            texts = [constant_ref(a) if resolve else "$" + _describe(a) for a in arrays]
            return f"{attr.name}=[{', '.join(texts)}]"
        return f"{attr.name}={_plain(attr.value)!r}"

    def node_text(node: ir.Node, resolve: bool) -> str:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain + "."
        inputs = ", ".join(input_ref(v, resolve) for v in node.inputs)
        attrs = ", ".join(attribute_text(a, resolve) for _, a in sorted(node.attributes.items()))
        return f"{domain}{node.op_type}({inputs})" + (f" {{{attrs}}}" if attrs else "")

    pending = list(graph)
    index = 0  # of the next node in the walk
    while pending:
        ready = [
            (node_text(node, resolve=False), position)
            for position, node in enumerate(pending)
            if all(v is None or id(v) in refs or _is_constant(v) for v in node.inputs)
        ]
        if not ready:
            names = sorted({v.name or "?" for n in pending for v in n.inputs if v is not None and id(v) not in refs})
            raise AssertionError(f"the graph has a cycle or reads undefined values: {names[:5]}")
        _, position = min(ready)
        node = pending.pop(position)
        outputs = ", ".join(f"%{index}.{j}" for j in range(len(node.outputs)))
        lines.append(f"{outputs} = {node_text(node, resolve=True)}")
        for j, value in enumerate(node.outputs):
            refs[id(value)] = f"%{index}.{j}"
        index += 1
    lines.extend(f"output {input_ref(value, resolve=True)}" for value in graph.outputs)
    lines.extend(f"constant $c{i}: {_describe(array)}" for i, array in enumerate(constants))
    return CanonicalGraph(tuple(lines), tuple(constants))


def assert_same_structure(
    actual: ir.Model | onnx.ModelProto | str,
    expected: ir.Model | onnx.ModelProto | str,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Assert that two graphs are the same up to names: ops with their domains, wiring, attributes, graph
    inputs and outputs, and constant values (within ``rtol``/``atol``; exact by default).

    Raises:
        AssertionError: with a diff of the two canonical listings, or the first constant that differs.
    """
    got, want = canonical_form(actual), canonical_form(expected)
    if got.lines != want.lines:
        diff = "\n".join(
            difflib.unified_diff(want.text().splitlines(), got.text().splitlines(), "expected", "actual", lineterm="")
        )
        raise AssertionError(f"the graphs differ in structure:\n{diff}")
    for index, (g, w) in enumerate(zip(got.constants, want.constants, strict=True)):
        if g.dtype.kind in "fc":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"constant $c{index}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"constant $c{index}")


def _as_ir(model: ir.Model | onnx.ModelProto | str) -> ir.Model:
    if isinstance(model, str):
        model = onnx.parser.parse_model(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return model


def _plain(value: object) -> object:
    """An attribute value as plain Python (floats at float32 precision, as ONNX stores them)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(np.float32(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value


def _is_constant(value: ir.Value) -> bool:
    """An initializer (a value with a constant and no producer; a folded node output is not one)."""
    return value.producer() is None and value.const_value is not None


def _describe(array: np.ndarray) -> str:
    return f"{array.dtype}[{','.join(str(d) for d in array.shape)}]"


def _preview(array: np.ndarray) -> str:
    flat = array.reshape(-1)
    values = np.array2string(flat[:8], separator=", ", precision=6)
    return values if flat.size <= 8 else values[:-1] + ", ...]"


def _value_type(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = ",".join(str(d) for d in value.shape) if value.shape is not None else "?"
    return f"{dtype}[{shape}]"
