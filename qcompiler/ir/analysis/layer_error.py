"""The error of a quantized model, layer by layer: the SQNR of every activation the QDQ model quantizes against the
float tensor of the same name, measured on one calibration batch while :func:`qcompiler.compile` runs
(``report["layers"]``, drawn by :mod:`qcompiler.report`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from qcompiler.ir.ops import LAYOUT_OPS
from qcompiler.ir.ort_session import serialize_sharing_weights

logger = logging.getLogger(__name__)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - y)^2)`` in dB; None where the two agree
    exactly or the reference is all zeros (no finite ratio)."""
    x = np.asarray(reference, dtype=np.float32).ravel()
    error = x - np.asarray(actual, dtype=np.float32).ravel()
    return _decibels(float(np.dot(x, x)), float(np.dot(error, error)))


def _decibels(signal: float, noise: float) -> float | None:
    if noise == 0.0 or signal == 0.0 or not np.isfinite(signal) or not np.isfinite(noise):
        return None  # JSON has no infinity, and no ratio is finite here
    return 10.0 * float(np.log10(signal / noise))


def activation_name(quantized: str, source: str) -> str:
    """The float tensor a QuantizeLinear stores: its output is named ``<tensor>_q`` by QuantizeQDQPass (also for a
    graph output, whose float value was renamed ``<tensor>_float``); otherwise the tensor it reads."""
    return quantized[: -len("_q")] if quantized.endswith("_q") else source


@dataclasses.dataclass(frozen=True)
class _Stored:
    """How the QDQ model stores one activation: its QuantizeLinear's output (the codes) and parameters."""

    codes: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int  # of the scales, when one per channel (negative: from the last)
    bits: int

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The float values ``codes`` stand for: ``(q - zero) * scale``."""
        return dequantize(codes, self.scale, self.zero_point, self.axis, 0, np.float32)


class LayerErrorProbe:
    """Per-layer error of the QDQ model against the float one, on one calibration batch.

    Capture the float model before QuantizeQDQPass edits it in place, then :meth:`measure` the QDQ model: the
    SQNR of every quantized activation as the integer code holds it (its QuantizeLinear's codes times their
    scales) against the float tensor of the same name, in the float graph's order; not the outputs of layout ops
    (Reshape, Transpose: their input's values, so their input's error). Only those tensors are exposed, once
    each: one forward pass of each model. Neither step raises: a statistic is a nicety, never a reason for a
    compile to fail.
    """

    def __init__(self, float_model: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
        # the graph copied, the weights held (the QDQ pass replaces them, it does not write into them): no copy
        self.float_model, self._float_weights = serialize_sharing_weights(float_model)
        self.feeds = dict(feeds)

    @classmethod
    def capture(cls, float_model: ir.Model, batches: Any) -> LayerErrorProbe | None:
        """A probe on the first of ``batches`` (a list; a stream is read once, by calibration), or None."""
        from qcompiler.calibrate import as_feeds

        if not isinstance(batches, list) or not batches:
            logger.debug("per-layer error not measured: the calibration data is a stream, not a list of batches")
            return None
        try:
            return cls(float_model, as_feeds(float_model, batches[0]))
        except Exception as exc:
            logger.debug("per-layer error not measured: %s: %s", type(exc).__name__, exc)
            return None

    def measure(self, qdq_model: ir.Model, thresholds: Mapping[str, float]) -> list[dict[str, Any]] | None:
        """One row per quantized activation: ``tensor``, ``op`` (its producer, or ``input``), ``sqnr_db``,
        ``absmax`` (on this batch), ``threshold`` (calibration's clip), ``scale`` (the largest, per channel),
        ``channels`` and ``bits``; None (and a debug message) if it cannot be measured."""
        try:
            start = time.perf_counter()
            rows = self._measure(*serialize_sharing_weights(qdq_model), thresholds)
            logger.debug("per-layer error of %d activations in %.2fs", len(rows), time.perf_counter() - start)
            return rows
        except Exception as exc:
            logger.debug("per-layer error not measured: %s: %s", type(exc).__name__, exc)
            return None

    def _measure(
        self, qdq_model: onnx.ModelProto, qdq_weights: Mapping[str, np.ndarray], thresholds: Mapping[str, float]
    ) -> list[dict[str, Any]]:
        stored = _stored_activations(qdq_model)
        _per_tensor_form(qdq_model, _ranks(qdq_model))
        graph = self.float_model.graph
        producers = {value.name: "input" for value in graph.input}
        producers.update({output: node.op_type for node in graph.node for output in node.output})
        # in the float graph's order; a layout op's output holds its input's values, so its input's error
        names = [name for name in producers if name in stored and producers[name] not in LAYOUT_OPS]
        # both models in segments, in step: a float tensor waits only until its codes come (the graphs' orders
        # nearly agree), so a few segments' worth of activations are alive at a time, not all of them
        floats = _session(self.float_model, self._float_weights, names).run(self.feeds)
        waiting: dict[str, np.ndarray] = {}
        by_codes = {stored[name].codes: name for name in names}
        rows_by_name = {}
        for stored_name, stored_codes in _session(qdq_model, qdq_weights, list(by_codes)).run(self.feeds):
            name = by_codes[stored_name]
            while name not in waiting:
                float_name, values = next(floats)
                waiting[float_name] = values
            reference, layout = np.asarray(waiting.pop(name)), stored[name]
            threshold = thresholds.get(name)
            rows_by_name[name] = {
                "tensor": name,
                "op": producers[name],
                "sqnr_db": sqnr_db(reference, layout.values(stored_codes)),
                "absmax": float(np.max(np.abs(reference))) if reference.size else 0.0,
                "threshold": float(threshold) if threshold is not None else None,
                "scale": float(np.max(layout.scale)),
                "channels": int(layout.scale.size),
                "bits": layout.bits,
            }
        return [rows_by_name[name] for name in names]


def _session(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Any:
    """``model`` in onnxruntime sessions of consecutive segments (:class:`SegmentedSession`) with ``outputs``
    exposed, and the basic graph optimizations only: constant folding, no fusion that would compute the QDQ model
    another way."""
    import onnxruntime as ort

    from qcompiler.ir.ort_session import SegmentedSession

    return SegmentedSession(model, outputs, optimize=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, shared=weights)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """The rank of every value a QuantizeLinear reads or a DequantizeLinear writes (:func:`_per_tensor_form`)."""
    wanted = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input}
    wanted |= {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    ranks = {}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if info.name in wanted and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def _stored_activations(model: onnx.ModelProto) -> dict[str, _Stored]:
    """Float tensor name -> how ``model`` stores it, for every activation QuantizeLinear (constant scale)."""
    initializers = {t.name: len(t.dims) for t in model.graph.initializer}
    constants = _constants_named(model, {name for name, rank in initializers.items() if rank <= 1})  # not weights
    stored = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if node.input[0] in initializers:
            continue
        zero = constants.get(node.input[2]) if len(node.input) > 2 else None
        zero_point = zero if zero is not None else np.zeros((), np.uint8)
        name = activation_name(node.output[0], node.input[0])
        bits = 8 * zero_point.dtype.itemsize
        stored[name] = _Stored(node.output[0], constants[node.input[1]], zero_point, _axis(node), bits)
    return stored


def _constants_named(model: onnx.ModelProto, names: set[str]) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}


def _axis(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "axis"), 1)


def _per_tensor_form(model: onnx.ModelProto, ranks: Mapping[str, int]) -> None:
    """Rewrite every per-channel activation QuantizeLinear ``round(x / s_c)`` as ``Div(x, s_c)`` into a
    QuantizeLinear at scale 1, and every per-channel DequantizeLinear of such codes as one at scale 1 into a
    ``Mul`` by ``s_c``: the same codes and values, without onnxruntime's per-axis kernels (many times slower)."""
    graph = model.graph
    parameters = _constants_named(model, {t.name for t in graph.initializer if len(t.dims) == 1})
    initializers = {t.name for t in graph.initializer}
    added: dict[str, onnx.TensorProto] = {}

    def constant(name: str, array: np.ndarray) -> str:
        added.setdefault(name, numpy_helper.from_array(array, name))
        return name

    nodes = []
    for node in graph.node:
        scale = parameters.get(node.input[1]) if len(node.input) > 2 else None
        zero = parameters.get(node.input[2]) if len(node.input) > 2 else None
        activation = node.input[0] if node.op_type == "QuantizeLinear" else node.output[0]
        if (
            node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or scale is None
            or zero is None
            or scale.size == 1
            or np.any(zero != 0)
            or node.input[0] in initializers
            or activation not in ranks
        ):
            nodes.append(node)
            continue
        rank = ranks[activation]
        axis = _axis(node) % rank
        broadcast = constant(f"{node.input[1]}__axis{axis}of{rank}", scale.reshape((-1,) + (1,) * (rank - 1 - axis)))
        unit = [
            constant(f"{scale.dtype}__one", np.ones((), scale.dtype)),
            constant(f"{zero.dtype}__zero", np.zeros((), zero.dtype)),
        ]
        if node.op_type == "QuantizeLinear":
            divided = f"{node.input[0]}__divided"
            nodes.append(onnx.helper.make_node("Div", [node.input[0], broadcast], [divided]))
            nodes.append(onnx.helper.make_node("QuantizeLinear", [divided, *unit], list(node.output)))
        else:
            unscaled = f"{node.output[0]}__unscaled"
            nodes.append(onnx.helper.make_node("DequantizeLinear", [node.input[0], *unit], [unscaled]))
            nodes.append(onnx.helper.make_node("Mul", [unscaled, broadcast], list(node.output)))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added.values())


def dequantize(
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    axis: int,
    block: int,
    dtype: type[np.floating[Any]] = np.float64,
) -> np.ndarray:
    """``(q - zero) * scale`` with ONNX DequantizeLinear's broadcasting: per tensor, per ``axis``, or blocked."""
    scale = np.asarray(scale, dtype)
    zero = np.zeros_like(scale) if zero is None else np.asarray(zero).astype(dtype)
    if scale.size > 1:
        axis = axis % codes.ndim
        if block:  # one scale per ``block`` elements along ``axis``
            scale, zero = (
                np.repeat(a, block, axis=axis).take(range(codes.shape[axis]), axis=axis) for a in (scale, zero)
            )
        else:
            shape = [1] * codes.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
    elif not zero.any():
        return codes.astype(dtype) * scale.reshape(())
    return (codes.astype(dtype) - zero) * scale
