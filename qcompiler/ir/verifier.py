"""One structural verifier, run after every pass of a pipeline when verify-each is on."""

from __future__ import annotations

import onnx.defs
import onnx_ir as ir

from qcompiler.errors import VerificationError


def verify(model: ir.Model) -> None:
    """Check the graph's structure; raise :class:`VerificationError` naming the first offending node.

    Checks: nodes are in topological order and every input is defined before use; value names are unique;
    every graph output is produced; every op's domain is imported; every standard op (and every op of the
    ``qcompiler`` domain) has a schema at the imported opset and a legal input count.
    """
    graph = model.graph
    defined: set[int] = {id(v) for v in graph.inputs}
    defined.update(id(v) for v in graph.initializers.values())
    names: dict[str, str] = {}
    for value in list(graph.inputs) + list(graph.initializers.values()):
        if value.name:
            names[value.name] = "graph input or initializer"
    for index, node in enumerate(graph):
        label = node.name or f"#{index} ({node.op_type})"
        for position, value in enumerate(node.inputs):
            if value is None:
                continue
            if id(value) not in defined:
                raise VerificationError(
                    f"node {label}: input {position} ({value.name!r}) is used before it is defined "
                    "(graph not in topological order or a dangling value)"
                )
        if node.domain not in model.opset_imports:
            raise VerificationError(f"node {label}: domain {node.domain!r} is not imported by the model")
        _check_schema(node, label, model.opset_imports[node.domain])
        for value in node.outputs:
            if value.name in names and value.name:
                raise VerificationError(f"node {label}: output name {value.name!r} is already defined")
            if value.name:
                names[value.name] = label
            defined.add(id(value))
    for value in graph.outputs:
        if id(value) not in defined:
            raise VerificationError(f"graph output {value.name!r} is produced by no node")


def _check_schema(node: ir.Node, label: str, version: int) -> None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
    except onnx.defs.SchemaError:
        if domain in ("", "qcompiler"):
            raise VerificationError(
                f"node {label}: op {node.op_type} has no schema in domain {domain or 'ai.onnx'} at opset {version}"
            ) from None
        return  # third-party domains are checked by whoever defines them
    inputs = len(node.inputs)
    if inputs < schema.min_input or inputs > schema.max_input:
        raise VerificationError(
            f"node {label}: op {node.op_type} takes {schema.min_input}..{schema.max_input} inputs, got {inputs}"
        )
