"""Calibration: run the float graph in onnxruntime over batches and observe every activation's range."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler.errors import CalibrationError
from qcompiler.ir.ort_session import SegmentedSession
from qcompiler.observers import Observer, make_observer

logger = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


def input_specs(model: ir.Model) -> list[tuple[str, tuple[int | None, ...], np.dtype]]:
    """(name, shape with None for dynamic dims, numpy dtype) of every graph input."""
    specs = []
    for value in model.graph.inputs:
        shape = tuple(d if isinstance(d, int) else None for d in value.shape) if value.shape is not None else ()
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        specs.append((value.name or "", shape, dtype))
    return specs


def as_feeds(model: ir.Model, batch: Any, argument: str = "calibration") -> dict[str, np.ndarray]:
    """Turn a batch (dict, sequence of arrays, one array or torch tensors) into checked ORT feeds.

    Raises:
        CalibrationError: a missing input, or a shape or dtype that does not fit the model's input.
    """
    specs = input_specs(model)
    if isinstance(batch, Mapping):
        unknown = set(batch) - {name for name, _, _ in specs}
        if unknown:
            raise CalibrationError(
                f"{argument}: unknown input name(s) {sorted(unknown)}; the model's inputs are "
                f"{[name for name, _, _ in specs]}"
            )
        arrays = [batch.get(name) for name, _, _ in specs]
    elif isinstance(batch, list | tuple):
        arrays = list(batch)
    else:
        arrays = [batch]
    if len(arrays) != len(specs):
        raise CalibrationError(f"{argument}: the model takes {len(specs)} input(s), got {len(arrays)}")
    feeds: dict[str, np.ndarray] = {}
    for (name, shape, dtype), array in zip(specs, arrays, strict=True):
        if array is None:
            raise CalibrationError(f"{argument}: input {name!r} is missing")
        array = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
        if array.ndim != len(shape) or any(d is not None and d != a for d, a in zip(shape, array.shape, strict=True)):
            raise CalibrationError(
                f"{argument}: input {name!r} has shape {tuple(array.shape)}, the model expects "
                f"{tuple('?' if d is None else d for d in shape)}"
            )
        if array.dtype.kind not in "fiub":
            raise CalibrationError(f"{argument}: input {name!r} has dtype {array.dtype}, expected {dtype}")
        feeds[name] = array.astype(dtype, copy=False)
    return feeds


def _float_values(model: ir.Model) -> list[str]:
    names = [v.name for v in model.graph.inputs if v.dtype in _FLOAT_TYPES and v.name]
    for node in model.graph:
        for value in node.outputs:
            if value.name and (value.dtype is None or value.dtype in _FLOAT_TYPES):
                names.append(value.name)
    return names


@dataclasses.dataclass
class ActivationRanges:
    """What calibration observed: the clipping threshold of every activation (from the chosen observer) and
    its exact per-channel ``max |x|`` along the last axis (for wide int16 tensors and per-channel scales)."""

    thresholds: dict[str, float]
    channel_absmax: dict[str, np.ndarray]
    #: ``2 X^T X / N`` of every activation a constant-weight linear reads (with ``hessians=True``): for GPTQ
    hessians: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: ``mean |x_c|`` per channel of the same activations (with ``hessians=True``): AWQ's activation statistic
    channel_meanabs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _linear_inputs(model: ir.Model) -> set[str]:
    """Names of the activations read as input 0 by a MatMul/Gemm with a constant 2-D weight."""
    names = set()
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[0] is not None:
            weight = node.inputs[1]
            if weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
                names.add(node.inputs[0].name)
    return names


def observe(
    model: ir.Model,
    data: Iterable[Batch],
    *,
    observer: str = "minmax",
    percentile: float = 99.99,
    progress: bool = True,
    max_batches: int | None = None,
    hessians: bool = False,
) -> ActivationRanges:
    """Observe the float graph on ``data``: thresholds from ``observer`` and exact per-channel maxima.

    Args:
        model: the float model (not modified).
        data: an iterable of batches; consumed once, one batch in memory at a time.
        observer: ``minmax``, ``percentile`` or ``mse``.
        percentile: the percentile of ``|x|`` for the percentile observer.
        progress: show a progress bar.
        max_batches: stop after this many batches.
        hessians: also accumulate ``X^T X`` and ``mean |x_c|`` of every linear layer's input (GPTQ, AWQ).

    Raises:
        CalibrationError: no data, or a batch that does not fit the model.
    """
    names = _float_values(model)
    wanted = _linear_inputs(model) if hessians else set()
    sums: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    session = SegmentedSession(model, names)  # a few hundred MB of activations alive at a time, not all of them
    observers: dict[str, Observer] = {}
    channel_absmax: dict[str, np.ndarray] = {}
    seen = 0
    for batch in tqdm(data, desc="calibrating", unit="batch", disable=not progress):
        feeds = as_feeds(model, batch)
        for name, values in session.run(feeds):
            values = np.asarray(values)
            if values.dtype.kind != "f":
                continue
            if name not in observers:
                observers[name] = make_observer(observer, percentile)
            observers[name].update(values)
            if name in wanted and values.ndim:
                rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
                sums[name] = sums.get(name, 0.0) + rows.T @ rows
                abs_sums[name] = abs_sums.get(name, 0.0) + np.abs(rows).sum(axis=0)
                counts[name] = counts.get(name, 0) + len(rows)
            if values.size:
                per_channel = np.abs(values.reshape(-1, values.shape[-1] if values.ndim else 1)).max(axis=0)
                previous = channel_absmax.get(name)
                if previous is None:
                    channel_absmax[name] = per_channel.astype(np.float64)
                elif previous.shape == per_channel.shape:
                    np.maximum(previous, per_channel, out=previous)
                else:  # the last axis changed size between batches: only the overall maximum is meaningful
                    channel_absmax[name] = np.array([max(previous.max(), per_channel.max())])
        seen += 1
        if max_batches is not None and seen >= max_batches:
            break
    if seen == 0:
        raise CalibrationError("calibration: the data iterable yielded no batch")
    logger.info("calibrated %d tensors over %d batches", len(observers), seen)
    return ActivationRanges(
        {name: obs.absmax() for name, obs in observers.items()},
        channel_absmax,
        {name: 2.0 * total / max(counts[name], 1) for name, total in sums.items()},
        {name: total / max(counts[name], 1) for name, total in abs_sums.items()},
    )


def calibrate(
    model: ir.Model,
    data: Iterable[Batch],
    *,
    observer: str = "minmax",
    percentile: float = 99.99,
    progress: bool = True,
    max_batches: int | None = None,
) -> dict[str, float]:
    """The clipping threshold ``absmax`` of every activation (:func:`observe` without the per-channel maxima)."""
    return observe(
        model, data, observer=observer, percentile=percentile, progress=progress, max_batches=max_batches
    ).thresholds
