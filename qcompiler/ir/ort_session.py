"""One way to hand a model (an ``onnx_ir.Model`` or an ``onnx.ModelProto``) to onnxruntime: calibration, the
pipeline's probe runs and the per-layer error."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.logs import verbose

ORT_MAX_IR_VERSION = 10  # enough for opset 21; newer onnx writes IR versions onnxruntime 1.31 rejects (> 13)


def session_log_level() -> int:
    """onnxruntime's own log level for our sessions: errors only (3), unless the ``qcompiler`` logger is at
    DEBUG (``--verbose``), then its warnings too (2). Its warnings ("Removing initializer ... not used by any
    node") are about models mid-pipeline, nothing a user can act on."""
    return 2 if verbose() else 3


def onnxruntime_session(
    model: ir.Model | onnx.ModelProto,
    extra_outputs: Sequence[str] = (),
    optimize: bool | ort.GraphOptimizationLevel = True,
    arena: bool = True,
) -> ort.InferenceSession:
    """A CPU session for ``model``, with ``extra_outputs`` (intermediate value names) exposed as outputs.

    Dangling initializers are dropped (onnxruntime rejects them) and the IR version is capped. An ``ir.Model`` is
    serialized first; a ``ModelProto`` is edited in place (so no second copy of its weights is made).

    Args:
        model: the model to run.
        extra_outputs: names of intermediate values to expose as outputs too.
        optimize: onnxruntime's graph optimizations: all of them (True), none (False), or this level.
        arena: onnxruntime's memory arena, which keeps a run's peak allocated for the next run (fast for repeated
            runs); off, memory goes back after each run (:class:`SegmentedSession`'s many sessions).
    """
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra_outputs if n not in existing)
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for index in reversed(range(len(proto.graph.initializer))):  # deleted in place: no copy of the kept ones
        if proto.graph.initializer[index].name not in used:
            del proto.graph.initializer[index]
    options = ort.SessionOptions()
    options.log_severity_level = session_log_level()
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = arena
    if optimize is False:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif optimize is not True:
        options.graph_optimization_level = optimize
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


#: how many bytes of exposed values one segment of a :class:`SegmentedSession` may produce in one run
SEGMENT_BYTES = 256 << 20


@dataclasses.dataclass
class _Segment:
    session: ort.InferenceSession
    inputs: list[str]  # values it reads from the feeds or from earlier segments
    outputs: list[str]  # values it hands on (to later segments) or exposes
    last_reader_of: list[str]  # inputs no later segment reads: dropped after this one runs


class SegmentedSession:
    """Run ``model`` with many intermediate values exposed, in consecutive segments of its nodes (graph order),
    so that one run holds about ``budget_bytes`` of exposed values at a time instead of all of them (SmolLM2 at
    512 tokens exposes 2.9 GB). Values a later segment reads are carried across; everything else is dropped as
    soon as it has been handed to the caller. Each segment is its own onnxruntime session without a memory
    arena; the weights are in them once (an initializer two segments read is in both).

    :meth:`run` yields ``(name, array)`` for every exposed value (graph inputs first, then in graph order), one
    segment's worth alive at a time; the caller reduces each before asking for the next. A model with subgraphs
    (If, Loop) or a cut crossed by a value of unknown type runs as one segment."""

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        exposed: Sequence[str],
        budget_bytes: int | None = None,
        optimize: bool | ort.GraphOptimizationLevel = False,
    ) -> None:
        budget_bytes = SEGMENT_BYTES if budget_bytes is None else budget_bytes
        proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
        graph = (model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)).graph  # no data copy
        wanted = set(exposed)
        self.exposed_inputs = [v.name for v in graph.inputs if v.name in wanted]
        types = {v.name: v for v in graph.inputs if v.name}
        types.update((v.name, v) for node in graph for v in node.outputs if v.name)
        nodes = list(proto.graph.node)
        groups = _segments(nodes, wanted, types, budget_bytes)
        initializers = {t.name: t for t in proto.graph.initializer}
        produced = {name: g for g, group in enumerate(groups) for i in group for name in nodes[i].output if name}
        last_read: dict[str, int] = {}
        for g, group in enumerate(groups):
            for i in group:
                for name in _reads(nodes[i]):
                    last_read[name] = g
        finals = {o.name for o in proto.graph.output}
        self.segments: list[_Segment] = []
        for g, group in enumerate(groups):
            reads = list(dict.fromkeys(name for i in group for name in _reads(nodes[i])))
            inputs = [n for n in reads if n not in initializers and produced.get(n, -1) != g]
            outputs = [
                name
                for i in group
                for name in nodes[i].output
                if name and (name in wanted or name in finals or last_read.get(name, -1) > g)
            ]
            part = onnx.helper.make_graph(
                [nodes[i] for i in group],
                f"{proto.graph.name}_segment_{g}",
                [_value_info(types[n]) for n in inputs],
                [],
                [initializers[n] for n in reads if n in initializers],
            )
            part_model = onnx.helper.make_model(part, opset_imports=list(proto.opset_import))
            part_model.ir_version = proto.ir_version
            part_model.functions.extend(proto.functions)
            session = onnxruntime_session(part_model, outputs, optimize=optimize, arena=len(groups) == 1)
            done = [n for n in inputs if last_read.get(n) == g and n not in finals]
            self.segments.append(_Segment(session, inputs, outputs, done))
        self._wanted = wanted
        self._carried = {name for segment in self.segments for name in segment.inputs}

    def run(self, feeds: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for name in self.exposed_inputs:
            yield name, feeds[name]
        live = dict(feeds)
        for segment in self.segments:
            results = segment.session.run(segment.outputs, {n: live[n] for n in segment.inputs})
            for name in segment.last_reader_of:
                live.pop(name, None)
            for name, value in zip(segment.outputs, results, strict=True):
                live[name] = value
            del results
            for name in segment.outputs:
                if name in self._wanted:
                    value = live[name] if name in self._carried else live.pop(name)
                    yield name, value
                    del value


def _reads(node: onnx.NodeProto) -> list[str]:
    return [name for name in node.input if name]


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _nbytes(value: ir.Value | None) -> int:
    if value is None or value.dtype is None or value.shape is None or not value.shape.is_static():
        return 0
    count = 1
    for dim in value.shape:
        count *= int(dim)
    return count * value.dtype.itemsize


def _segments(
    nodes: list[onnx.NodeProto], wanted: set[str], types: dict[str, ir.Value], budget: int
) -> list[list[int]]:
    """Node indices in consecutive groups of about ``budget`` bytes of exposed outputs; one group where a cut
    would need a value of unknown type or the graph has subgraphs."""
    everything = [list(range(len(nodes)))]
    if any(_has_subgraph(node) for node in nodes):
        return everything
    groups: list[list[int]] = [[]]
    held = 0
    for index, node in enumerate(nodes):
        groups[-1].append(index)
        held += sum(_nbytes(types.get(name)) for name in node.output if name in wanted)
        if held >= budget and index + 1 < len(nodes):
            groups.append([])
            held = 0
    produced = {name: g for g, group in enumerate(groups) for i in group for name in nodes[i].output if name}
    for g, group in enumerate(groups):
        for i in group:
            for name in _reads(nodes[i]):
                source = produced.get(name)
                if source is not None and source != g:
                    value = types.get(name)
                    if value is None or value.dtype is None:
                        return everything
    return groups


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    dims = None if value.shape is None else [d if isinstance(d, int) else (d.value or None) for d in value.shape]
    assert value.dtype is not None
    return onnx.helper.make_tensor_value_info(value.name, value.dtype.value, dims)
