"""One way to hand a model (an ``onnx_ir.Model`` or an ``onnx.ModelProto``) to onnxruntime: calibration, the
pipeline's probe runs and the per-layer error."""

from __future__ import annotations

from collections.abc import Sequence

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
) -> ort.InferenceSession:
    """A CPU session for ``model``, with ``extra_outputs`` (intermediate value names) exposed as outputs.

    Dangling initializers are dropped (onnxruntime rejects them) and the IR version is capped. An ``ir.Model`` is
    serialized first; a ``ModelProto`` is edited in place (so no second copy of its weights is made).

    Args:
        model: the model to run.
        extra_outputs: names of intermediate values to expose as outputs too.
        optimize: onnxruntime's graph optimizations: all of them (True), none (False), or this level.
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
    if optimize is False:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif optimize is not True:
        options.graph_optimization_level = optimize
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
