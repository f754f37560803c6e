"""Float functions of an integer index input become tables read by a Gather.

A causal LM compiled for a KV cache takes its positions as an input, and the exporter writes RoPE's tables as
float arithmetic on them (``Cos(Cast(position_ids) * inv_freq)``, ALiBi's slopes and learned position embeddings
likewise): float work at run time that the integer path has no form for. An index input has a known range
(positions lie in ``[0, max_context)``), so every float value computed from it and constants alone, one row per
index, is a table of ``bound`` rows: ``v = Gather(T, index)`` with ``T = v(arange(bound))``. The table is computed
by onnxruntime on the graph's own nodes (whatever the exporter wrote, any RoPE variant), and checked on random
indices before anything is rewritten; a value whose rows depend on more than their own index (a cumulative sum
over positions) fails that check and is left as it was, for the quantizer to refuse by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array, consumers, is_graph_output, unique_name

logger = logging.getLogger(__name__)

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
PROBE_INDICES = 7
PROBE_SEED = 0


def _index_axis(value: ir.Value) -> int | None:
    """The one axis of an index input that is not 1 (the sequence), or None when the shape is not of that form."""
    if value.shape is None:
        return None
    axes = [i for i, d in enumerate(value.shape) if not (isinstance(d, int) and d == 1)]
    return axes[0] if len(axes) == 1 else None


def _cone(graph: ir.Graph, source: ir.Value) -> list[ir.Node]:
    """Nodes computed from ``source`` and constants alone, in graph order."""
    inside = {id(source)}
    nodes = []
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if not any(id(v) in inside for v in inputs):
            continue
        has_subgraph = any(a.type == ir.AttributeType.GRAPH for a in node.attributes.values())
        if all(id(v) in inside or const_array(v) is not None for v in inputs) and not has_subgraph:
            nodes.append(node)
            inside.update(id(v) for v in node.outputs)
    return nodes


def _frontier(graph: ir.Graph, cone: list[ir.Node]) -> list[ir.Value]:
    """The float values (or of unknown type: checked once evaluated) of the cone read outside it or outputs."""
    members = {id(n) for n in cone}
    return [
        v
        for node in cone
        for v in node.outputs
        if (v.dtype is None or v.dtype in _FLOATS)
        and (is_graph_output(graph, v) or any(id(c) not in members for c in consumers(v)))
    ]


def _cone_session(model: ir.Model, source: ir.Value, cone: list[ir.Node], targets: list[ir.Value]) -> Any:
    """An onnxruntime session computing ``targets`` from ``source`` alone: the cone's own nodes, nothing else."""
    from qcompiler.ir.ort_session import onnxruntime_session

    sub_source = ir.Value(name=source.name, shape=source.shape, type=source.type)
    mapping: dict[int, ir.Value] = {id(source): sub_source}
    nodes = []
    for node in cone:
        inputs: list[ir.Value | None] = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
            elif id(v) in mapping:
                inputs.append(mapping[id(v)])
            else:
                array = const_array(v)
                assert array is not None
                inputs.append(
                    ir.Value(
                        name=v.name,
                        const_value=ir.tensor(array),
                        shape=ir.Shape(array.shape),
                        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    )
                )
        copy = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                       num_outputs=len(node.outputs), name=node.name, version=node.version)  # fmt: skip
        for old, new in zip(node.outputs, copy.outputs, strict=True):
            new.name = old.name
            if old.dtype is not None:
                new.dtype = old.dtype
            mapping[id(old)] = new
        nodes.append(copy)
    initializers = [v for n in nodes for v in n.inputs if v is not None and v.const_value is not None]
    unique = list({v.name: v for v in initializers}.values())
    outputs = [mapping[id(v)] for v in targets]
    sub = ir.Graph([sub_source], outputs, nodes=nodes, initializers=unique, opset_imports=model.opset_imports)
    return onnxruntime_session(ir.Model(sub, ir_version=model.ir_version))


class TabulateIndexFunctionsPass(ir.passes.InPlacePass):
    """Float values computed from an integer index input alone become ``Gather(table, index)``.

    Args:
        bounds: input name -> number of index values (a position input and the model's maximum context).
    """

    def __init__(self, bounds: Mapping[str, int]) -> None:
        super().__init__()
        self.bounds = dict(bounds)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for source in list(graph.inputs):
            if source.name not in self.bounds:
                continue
            axis = _index_axis(source)
            if source.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or axis is None:
                logger.info("tabulate: %s is not an integer index of one non-unit axis; left as it is", source.name)
                continue
            cone = _cone(graph, source)
            frontier = _frontier(graph, cone)
            if not frontier:
                continue
            session = _cone_session(model, source, cone, frontier)
            bound = self.bounds[source.name]
            full_shape = [1] * len(source.shape)
            full_shape[axis] = bound
            everything = np.arange(bound, dtype=source.dtype.numpy()).reshape(full_shape)
            tables = [np.asarray(a) for a in session.run(None, {source.name: everything})]
            probe_shape = list(full_shape)
            probe_shape[axis] = PROBE_INDICES
            probe = np.random.default_rng(PROBE_SEED).integers(0, bound, probe_shape).astype(everything.dtype)
            probed = [np.asarray(a) for a in session.run(None, {source.name: probe})]
            for value, table, check in zip(frontier, tables, probed, strict=True):
                if table.dtype.kind != "f":
                    continue  # integer index arithmetic: already integer
                axes = [i for i, (a, b) in enumerate(zip(table.shape, check.shape, strict=False)) if a != b]
                if table.ndim != check.ndim or len(axes) != 1 or table.shape[axes[0]] != bound:
                    logger.info("tabulate: %s (shape %s) has no one axis of %d indices; left as it is", value.name,
                                table.shape, bound)  # fmt: skip
                    continue
                rows = np.moveaxis(table, axes[0], 0)
                expected = np.moveaxis(rows[probe.reshape(-1)], 0, axes[0])
                if not np.allclose(expected, check, rtol=1e-5, atol=1e-6):
                    logger.info("tabulate: the rows of %s depend on more than their own index; left as it is",
                                value.name)  # fmt: skip
                    continue
                name = unique_name(graph, f"{value.name}_table")
                table_value = add_initializer(graph, name, np.ascontiguousarray(rows))
                gather = ir.node("Gather", [table_value, source], attributes={"axis": 0})
                gather.outputs[0].name = unique_name(graph, f"{value.name}_rows")
                gather.outputs[0].dtype = ir.DataType.from_numpy(rows.dtype)
                target = [int(d) for d in table.shape]
                target[axes[0]] = -1  # the index axis: as many rows as indices
                shape = add_initializer(graph, f"{name}_shape", np.array(target, np.int64))
                reshape = ir.node("Reshape", [gather.outputs[0], shape])
                reshape.outputs[0].name = unique_name(graph, f"{value.name}_by_index")
                reshape.outputs[0].dtype = ir.DataType.from_numpy(rows.dtype)
                reshape.outputs[0].shape = value.shape
                producer = value.producer()
                assert producer is not None
                graph.insert_after(producer, [gather, reshape])
                value.replace_all_uses_with(reshape.outputs[0], replace_graph_outputs=True)
                logger.info("tabulate: %s is now %d rows read at %s", value.name, bound, source.name)
                modified = True
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
