"""The trained PP-OCR models (qcompiler.testing.trained) side by side: onnxruntime float32, onnxruntime's own static
quantization (the peer: QDQ, per-channel int8 weights, asymmetric uint8 activations, percentile ranges), and our
integer-only compiles with the recipes named. Task metric, output SQNR against float, and latency (median of each
run, the range over runs) as a ratio to onnxruntime float in the same process.

    .venv/bin/python benchmarks/bench_trained.py [--models cls,rec] [--recipes w8a8-tables,w8a16] [--runs 3]

Prints a markdown table and writes benchmarks/results/trained.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_seconds, print_table, save

COLUMNS = ["model", "path", "metric", "sqnr dB", "ms (runs)", "vs float"]


def _sqnr(got: np.ndarray, want: np.ndarray) -> float:
    error = np.sum((got.astype(np.float64) - want) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / error))


def _peer_session(case: Any, threads: int) -> Any:
    """onnxruntime.quantization.quantize_static of the case's model, calibrated on the same batches."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = case.model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(case.calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, quantized = (str(Path(folder) / f) for f in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(version_converter.convert_version(case.model, 17), source)  # per-channel DQ needs opset 13+
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(quantized, options, providers=["CPUExecutionProvider"])


def _timed(function: Any, x: np.ndarray, runs: int) -> list[float]:
    return [1e3 * median_seconds(lambda: function(x), warmup=3, repeats=10, inner=1) for _ in range(runs)]


def main() -> None:
    import onnxruntime as ort

    import qcompiler
    from qcompiler.testing import trained

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cls,rec")
    parser.add_argument("--recipes", default="w8a8-tables,auto", help="our recipes, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for model in args.models.split(","):
        case = trained.load_case(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = case.inputs[: case.batch]

        def run_float(batch: np.ndarray, session: Any = session, name: str = name) -> Any:
            return session.run(None, {name: batch})[0]

        reference = case.run(run_float)
        paths: list[tuple[str, Any]] = [("onnxruntime float32", run_float)]
        peer = _peer_session(case, args.threads)
        peer_name = peer.get_inputs()[0].name
        paths.append(("onnxruntime quantize_static (uint8 asym, percentile)",
                      lambda batch, s=peer, n=peer_name: s.run(None, {n: batch})[0]))  # fmt: skip
        for recipe in args.recipes.split(","):
            start = time.perf_counter()
            compiled = qcompiler.compile(case.model, calibration=case.calibration, recipe=recipe, progress=False)
            chosen = compiled.report.get("recipe")
            paths.append((f"qcompiler {recipe} ({chosen}, {time.perf_counter() - start:.0f} s compile)", compiled))
        float_ms: list[float] = []
        for label, function in paths:
            outputs = case.run(function)
            ms = _timed(function, x, args.runs)
            float_ms = float_ms or ms
            rows.append({
                "model": model,
                "path": label,
                "metric": round(case.score(outputs), 2),
                "sqnr dB": round(_sqnr(outputs, reference), 1),
                "ms (runs)": f"{np.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})",
                "vs float": f"{np.median(float_ms) / np.median(ms):.2f}x",
            })  # fmt: skip
            print(rows[-1], flush=True)
    print_table(rows, COLUMNS)
    save("trained", rows, {"metric": {m: trained.load_case(m).metric for m in args.models.split(",")}})


if __name__ == "__main__":
    main()
