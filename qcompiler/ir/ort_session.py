"""One way to hand a model (an ``onnx_ir.Model`` or an ``onnx.ModelProto``) to onnxruntime: calibration, the
pipeline's probe runs and the per-layer error."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
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


#: initializers of at least this many bytes reach onnxruntime as the arrays the IR holds, not copied into the
#: serialized model (:func:`serialize_sharing_weights`)
SHARED_BYTES = 1 << 16
#: the external-data location of a shared initializer: a name onnxruntime is handed the array for, never a file
_SHARED_LOCATION = "qcompiler-shared-weights"
#: element types whose numpy array is the tensor's exact in-memory layout (INT4, BFLOAT16, FLOAT8 are not)
_NUMPY_EXACT = {
    ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT8: np.int8, ir.DataType.UINT8: np.uint8, ir.DataType.INT16: np.int16, ir.DataType.INT32: np.int32,
    ir.DataType.INT64: np.int64, ir.DataType.BOOL: np.bool_,
}  # fmt: skip


def serialize_sharing_weights(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` as a proto whose large weights (rank 2 and up, :data:`SHARED_BYTES`) are references to external
    data, and the arrays behind them (views of the IR's own tensors where they are numpy or torch: no copy).
    onnxruntime takes them with :func:`onnxruntime_session`'s ``shared``. The model is left as it was."""
    shared: dict[str, np.ndarray] = {}
    swapped: list[tuple[ir.Value, Any]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < SHARED_BYTES or tensor.dtype not in _NUMPY_EXACT or not value.name:
                continue
            if len(tensor.shape) < 2:  # vectors stay in the proto: small, and read back from it (layer_error.py)
                continue
            array = np.ascontiguousarray(tensor.numpy())
            if array.dtype != _NUMPY_EXACT[tensor.dtype] or array.nbytes != tensor.nbytes:
                continue
            shared[value.name] = array
            swapped.append((value, tensor))
            value.const_value = ir.ExternalTensor(
                _SHARED_LOCATION, 0, array.nbytes, tensor.dtype, shape=tensor.shape, name=value.name
            )
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return proto, shared


def onnxruntime_session(
    model: ir.Model | onnx.ModelProto,
    extra_outputs: Sequence[str] = (),
    optimize: bool | ort.GraphOptimizationLevel = True,
    arena: bool = True,
    shared: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """A CPU session for ``model``, with ``extra_outputs`` (intermediate value names) exposed as outputs.

    Dangling initializers are dropped (onnxruntime rejects them) and the IR version is capped. An ``ir.Model`` is
    serialized with its large initializers shared (:func:`serialize_sharing_weights`: onnxruntime reads the IR's
    arrays, no copy of the weights is made); a ``ModelProto`` is edited in place, its external initializers taken
    from ``shared``.

    Args:
        model: the model to run.
        extra_outputs: names of intermediate values to expose as outputs too.
        optimize: onnxruntime's graph optimizations: all of them (True), none (False), or this level.
        arena: onnxruntime's memory arena, which keeps a run's peak allocated for the next run (fast for repeated
            runs); off, memory goes back after each run (:class:`SegmentedSession`'s many sessions).
        shared: the arrays of a proto's shared initializers (from :func:`serialize_sharing_weights`); they must
            outlive the session (it keeps a reference).
    """
    if isinstance(model, ir.Model):
        proto, shared = serialize_sharing_weights(model)
    else:
        proto = model
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
    names = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    values = []
    if names:
        missing = [n for n in names if shared is None or n not in shared]
        if missing:
            raise ValueError(f"onnxruntime_session: no array for the external initializers {missing[:5]}")
        assert shared is not None
        values = [ort.OrtValue.ortvalue_from_numpy(shared[n]) for n in names]
        options.add_external_initializers(names, values)
        options.add_session_config_entry("session.disable_prepacking", "1")  # prepacking copies the weights
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session._qcompiler_weights = values  # onnxruntime reads them for the session's lifetime
    return session


#: how many bytes of exposed values one segment of a :class:`SegmentedSession` may produce in one run
SEGMENT_BYTES = 256 << 20


@dataclasses.dataclass
class _Segment:
    session: ort.InferenceSession
    inputs: list[str]  # values it reads from the feeds or from earlier segments
    outputs: list[str]  # values it hands on (to later segments) or exposes
    last_reader_of: list[str]  # inputs no later segment reads: dropped after this one runs


class SegmentedSession:
    """Run ``model`` (an ``ir.Model``, or a proto and its ``shared`` arrays) with many intermediate values
    exposed, in consecutive segments of its nodes (graph order), so that one run holds about ``budget_bytes`` of
    exposed values at a time instead of all of them (SmolLM2 at 512 tokens exposes 2.9 GB). Values a later
    segment reads are carried across; everything else is dropped as soon as it has been handed to the caller.
    Each segment is its own onnxruntime session without a memory arena, reading the weights the IR holds
    (:func:`serialize_sharing_weights`: no copy).

    :meth:`run` yields ``(name, array)`` for every exposed value (graph inputs first, then in graph order), one
    segment's worth alive at a time; the caller reduces each before asking for the next. A model with subgraphs
    (If, Loop) or a cut crossed by a value of unknown type runs as one segment."""

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        exposed: Sequence[str],
        budget_bytes: int | None = None,
        optimize: bool | ort.GraphOptimizationLevel = False,
        shared: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        budget_bytes = SEGMENT_BYTES if budget_bytes is None else budget_bytes
        if isinstance(model, ir.Model):
            proto, self._shared = serialize_sharing_weights(model)
            graph = model.graph
        else:  # a proto from serialize_sharing_weights and its arrays (or one with its weights inside)
            proto, self._shared = model, dict(shared or {})
            graph = ir.serde.deserialize_model(model).graph  # for the value types; the weights are not read
        wanted = set(exposed)
        self.exposed_inputs = [v.name for v in graph.inputs if v.name in wanted]
        types = {v.name: v for v in graph.inputs if v.name}
        types.update((v.name, v) for node in graph for v in node.outputs if v.name)
        nodes = list(proto.graph.node)
        groups = _segments(nodes, wanted, types, budget_bytes)
        initializers = {t.name: t for t in proto.graph.initializer}
        produced = _producers(nodes, groups)
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
            session = onnxruntime_session(
                part_model, outputs, optimize=optimize, arena=len(groups) == 1, shared=self._shared
            )
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
    produced = _producers(nodes, groups)
    for g, group in enumerate(groups):
        for i in group:
            for name in _reads(nodes[i]):
                source = produced.get(name)
                if source is not None and source != g:
                    value = types.get(name)
                    if value is None or value.dtype is None:
                        return everything
    return groups


def _producers(nodes: list[onnx.NodeProto], groups: list[list[int]]) -> dict[str, int]:
    """The group that computes each value."""
    return {name: g for g, group in enumerate(groups) for i in group for name in nodes[i].output if name}


def _value_info(value: ir.Value) -> onnx.ValueInfoProto:
    dims = None if value.shape is None else [d if isinstance(d, int) else (d.value or None) for d in value.shape]
    assert value.dtype is not None
    return onnx.helper.make_tensor_value_info(value.name, value.dtype.value, dims)
