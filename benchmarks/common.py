"""Shared timing and table helpers for the benchmarks (medians of repeated runs, same process)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcompiler import files

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], Any], *, warmup: int = 10, repeats: int = 30, inner: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def streaming_bandwidth_gb_s() -> float:
    """The machine's memory bandwidth as one thread streams it: numpy's sum over 1 GiB of int64, the median of 5,
    GB/s (a decode step's floor is its bytes over this)."""
    import numpy as np

    data = np.ones(1 << 27, np.int64)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        samples.append(time.perf_counter() - start)
    return data.nbytes / statistics.median(samples) / 1e9


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def save(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
        **(extra or {}),
    }
    return files.write_text(path, json.dumps(payload, indent=2))


def onnxruntime_float_and_dynamic(float_model: Any, threads: int) -> tuple[Any, Any]:
    """onnxruntime sessions (``threads`` intra-op threads) for a float ``onnx_ir`` model and for onnxruntime's own
    ``quantize_dynamic`` int8 model of it (QInt8 weights): the baselines of the model benchmarks."""
    import tempfile

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qcompiler.ir.ort_session import ORT_MAX_IR_VERSION

    proto = ir.serde.serialize_model(float_model)
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(proto, f"{folder}/float.onnx", save_as_external_data=True)
        session = ort.InferenceSession(f"{folder}/float.onnx", options, providers=["CPUExecutionProvider"])
        quantize_dynamic(f"{folder}/float.onnx", f"{folder}/dynamic.onnx", weight_type=QuantType.QInt8)
        dynamic = ort.InferenceSession(f"{folder}/dynamic.onnx", options, providers=["CPUExecutionProvider"])
    return session, dynamic
