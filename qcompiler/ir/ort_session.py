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
    data, and the arrays behind them: the IR's own arrays, or views of them (a torch export's linear weights are
    transposed views of the module's parameters), never copies. onnxruntime takes them with
    :func:`onnxruntime_session`'s ``shared``. The model is left as it was."""
    shared: dict[str, np.ndarray] = {}
    swapped: list[tuple[ir.Value, Any]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < SHARED_BYTES or tensor.dtype not in _NUMPY_EXACT or not value.name:
                continue
            if len(tensor.shape) < 2:  # vectors stay in the proto: small, and read back from it (layer_error.py)
                continue
            array = np.asarray(tensor.numpy())
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
) -> FedSession:
    """A CPU session for ``model``, with ``extra_outputs`` (intermediate value names) exposed as outputs.

    Dangling initializers are dropped (onnxruntime rejects them) and the IR version is capped. An ``ir.Model`` is
    serialized with its large initializers shared (:func:`serialize_sharing_weights`); a ``ModelProto`` is edited
    in place, its external initializers taken from ``shared``. Shared weights become graph inputs that the
    returned :class:`FedSession` feeds at every run: onnxruntime reads a fed array where it lies, while an
    initializer it is handed (``add_external_initializers``) is copied into the session, the whole model's
    weights again (measured: 8 x 64 MB weights, +520 MB). A transposed view (a torch export's linear weight)
    is fed as the contiguous array under it to a FusedMatMul with ``transB`` (:func:`_feed_shared_weights`).

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
    missing = [n for n in names if shared is None or n not in shared]
    if missing:
        raise ValueError(f"onnxruntime_session: no array for the external initializers {missing[:5]}")
    fed = _feed_shared_weights(proto, {n: shared[n] for n in names} if shared is not None else {})
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return FedSession(session, fed)


class FedSession:
    """An onnxruntime session and the weights it is fed at every run (:func:`onnxruntime_session`). ``run``
    takes the model's own inputs; ``get_inputs`` lists only those; the rest is the session's."""

    def __init__(self, session: ort.InferenceSession, weights: Mapping[str, np.ndarray]) -> None:
        self.session = session
        self.weights = dict(weights)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], *args: Any) -> list[Any]:
        return self.session.run(output_names, {**feeds, **self.weights}, *args)

    def get_inputs(self) -> list[Any]:
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


#: the suffix of the graph input that feeds a transposed weight's contiguous array (:func:`_feed_shared_weights`)
_TRANSPOSED = "::transposed"


def _feed_shared_weights(proto: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn ``proto``'s external initializers (``arrays``) into graph inputs, in place, and return the feeds: each
    array as it is when C-contiguous; anything else copied, except a 2-D array whose transpose is contiguous (a
    torch export's linear weight: a transposed view of the module's parameter) and which only MatMuls read, as
    their right operand, with more than one row on the left (``proto.graph.value_info`` says). That one is fed
    as the contiguous transpose, under ``name::transposed``, and the MatMuls become ``com.microsoft``
    FusedMatMul with ``transB=1``: the same MLAS GEMM told that B is transposed, bit-identical to the MatMul
    on a contiguous copy (tested). With one row MatMul takes a GEMV path the transposed GEMM does not match.
    (A Transpose node in front of the MatMul instead would copy the weight at every run, and onnxruntime runs
    the Transposes of graph inputs first: every weight copied at once.)"""
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    tensors = {t.name: t for t in proto.graph.initializer if t.name in external}
    for index in reversed(range(len(proto.graph.initializer))):
        if proto.graph.initializer[index].name in external:
            del proto.graph.initializer[index]
    transposable = _transposable(proto, {n for n, a in arrays.items() if n in external and _is_transposed(a)})
    feeds: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        array = arrays[name]
        if name in transposable:
            feeds[name + _TRANSPOSED] = array.T
            dims = list(tensor.dims)[::-1]
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name + _TRANSPOSED, tensor.data_type, dims))
            continue
        feeds[name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    if transposable:
        for node in proto.graph.node:
            if _is_matmul(node) and node.input[1] in transposable:
                node.op_type, node.domain = "FusedMatMul", _MICROSOFT
                node.input[1] += _TRANSPOSED
                node.attribute.append(onnx.helper.make_attribute("transB", 1))
        if not any(o.domain == _MICROSOFT for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(_MICROSOFT, 1))
    return feeds


_MICROSOFT = "com.microsoft"


def _is_transposed(array: np.ndarray) -> bool:
    """A float32 matrix stored transposed (FusedMatMul's CPU kernel is float32 only)."""
    return array.dtype == np.float32 and array.ndim == 2 and not array.flags.c_contiguous and array.T.flags.c_contiguous


def _is_matmul(node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2


def _transposable(proto: onnx.ModelProto, candidates: set[str]) -> set[str]:
    """The ``candidates`` that every reader (subgraphs and outputs included) reads as a MatMul's right operand
    with a left operand of known shape and more than one row."""
    if not candidates:
        return set()
    shapes: dict[str, list[int | None]] = {}
    for info in [*proto.graph.input, *proto.graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    refused = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if _has_subgraph(node):
            return set()
        for index, name in enumerate(node.input):
            if name not in candidates:
                continue
            left = shapes.get(node.input[0]) if _is_matmul(node) and index == 1 else None
            known = [d for d in (left or [])[:-1] if d is not None]
            rows = int(np.prod(known)) if left is not None and len(left) >= 2 and len(known) == len(left) - 1 else None
            if rows is None or rows < 2 or node.input[0] == name:
                refused.add(name)
    return candidates - refused


#: how many bytes of exposed values one segment of a :class:`SegmentedSession` may produce in one run
SEGMENT_BYTES = 256 << 20
#: how many bytes of shared weights one segment may read: onnxruntime's first run of a FusedMatMul holds a
#: transposed copy of its weight until the run ends (measured: a segment's worth, freed after)
SEGMENT_WEIGHT_BYTES = 256 << 20


@dataclasses.dataclass
class _Segment:
    session: FedSession
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
        initializers = {t.name: t for t in proto.graph.initializer}
        weights = {n: int(a.nbytes) for n, a in self._shared.items()}
        groups = _segments(nodes, wanted, types, budget_bytes, weights)
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
            lefts = {nodes[i].input[0] for i in group if _is_matmul(nodes[i])} - set(inputs)
            part = onnx.helper.make_graph(
                [nodes[i] for i in group],
                f"{proto.graph.name}_segment_{g}",
                [_value_info(types[n]) for n in inputs],
                [],
                [initializers[n] for n in reads if n in initializers],
                value_info=[_value_info(types[n]) for n in lefts if n in types and types[n].dtype is not None],
            )  # the MatMuls' left operands' shapes: _feed_shared_weights reads them
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
    nodes: list[onnx.NodeProto],
    wanted: set[str],
    types: dict[str, ir.Value],
    budget: int,
    weights: Mapping[str, int] | None = None,
) -> list[list[int]]:
    """Node indices in consecutive groups of about ``budget`` bytes of exposed outputs, and about
    :data:`SEGMENT_WEIGHT_BYTES` of the shared ``weights`` (name: bytes) they read; one group where a cut
    would need a value of unknown type or the graph has subgraphs."""
    everything = [list(range(len(nodes)))]
    if any(_has_subgraph(node) for node in nodes):
        return everything
    weights = weights or {}
    groups: list[list[int]] = [[]]
    held = read = 0
    for index, node in enumerate(nodes):
        groups[-1].append(index)
        held += sum(_nbytes(types.get(name)) for name in node.output if name in wanted)
        read += sum(weights.get(name, 0) for name in node.input)
        if (held >= budget or read >= SEGMENT_WEIGHT_BYTES) and index + 1 < len(nodes):
            groups.append([])
            held = read = 0
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
