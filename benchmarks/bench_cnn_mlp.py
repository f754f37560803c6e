"""Latency and accuracy: integer-only qcompiler code vs the float model in torch and onnxruntime.

Models: the trained MNIST CNN (ONNX model zoo) on scikit-learn digits, batch 1; and an MLP trained here on
scikit-learn digits (64 -> 256 -> 256 -> 10), batch 64. Every row is measured in this run, same threads.

    make bench            # or: .venv/bin/python benchmarks/bench_cnn_mlp.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, print_table, save

import qcompiler
from qcompiler.testing.data import digits_28x28, mnist_model_path

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def mnist_torch(model: onnx.ModelProto) -> torch.nn.Module:
    """The MNIST CNN rebuilt in torch from the ONNX initializers (same weights, same math)."""
    w = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(torch.nn.functional.conv2d(x, w["Parameter5"], w["Parameter6"].reshape(-1), padding=2))
            x = torch.nn.functional.max_pool2d(x, 2)
            x = torch.relu(torch.nn.functional.conv2d(x, w["Parameter87"], w["Parameter88"].reshape(-1), padding=2))
            x = torch.nn.functional.max_pool2d(x, 3)
            return x.reshape(1, 256) @ w["Parameter193"].reshape(256, 10) + w["Parameter194"]

    return Net().eval()


def train_mlp(x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(60):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(mlp(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    return mlp.eval()


def ort_session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def accuracy(predict, xs: list[np.ndarray], labels: np.ndarray) -> float:
    preds = np.concatenate([np.asarray(predict(x)).argmax(axis=-1).reshape(-1) for x in xs])
    return float(np.mean(preds == labels))


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = []

    # --- MNIST CNN, batch 1 ---------------------------------------------------------------------------
    images, labels = digits_28x28()
    calib_idx, test_idx = np.arange(1, len(images), 9), np.arange(len(images))
    start = time.perf_counter()
    compiled = qcompiler.compile(
        str(mnist_model_path()), calibration=[images[i : i + 1] for i in calib_idx], progress=False
    )
    compile_s = time.perf_counter() - start
    onnx_model = onnx.load(str(mnist_model_path()))
    net, session = mnist_torch(onnx_model), ort_session(str(mnist_model_path()))
    xs = [images[i : i + 1] for i in test_idx]
    x0 = xs[0]
    x0_t = torch.from_numpy(x0)
    with torch.no_grad():
        runners = {
            "qcompiler int8 (TVM, integer-only)": (compiled, lambda: compiled(x0)),
            "torch float32": (lambda x: net(torch.from_numpy(x)).numpy(), lambda: net(x0_t)),
            "onnxruntime float32": (
                lambda x: session.run(None, {"Input3": x})[0],
                lambda: session.run(None, {"Input3": x0}),
            ),
        }
        mnist_rows = []
        for name, (predict, call) in runners.items():
            mnist_rows.append(
                {
                    "model": "MNIST CNN (b=1)",
                    "runtime": name,
                    "accuracy": accuracy(predict, xs, labels),
                    "latency_us": median_seconds(call) * 1e6,
                }
            )
    _add_ratios(mnist_rows)
    mnist_rows[0]["compile_s"] = compile_s
    rows += mnist_rows

    # --- MLP on digits, batch 64 ----------------------------------------------------------------------
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = (digits.data / 16.0).astype(np.float32)
    target = digits.target.astype(np.int64)
    train, test = slice(0, 1200), slice(1200, 1200 + 576)
    mlp = train_mlp(data[train], target[train])
    batch = 64
    test_batches = [data[test][i : i + batch] for i in range(0, 576, batch)]
    calib = [data[train][i : i + batch] for i in range(0, 1152, batch)]
    start = time.perf_counter()
    compiled_mlp = qcompiler.compile(
        mlp, example_inputs=(torch.from_numpy(calib[0]),), calibration=calib, progress=False
    )
    mlp_compile_s = time.perf_counter() - start
    exported = torch.onnx.export(mlp, (torch.from_numpy(calib[0]),), dynamo=True, verbose=False).model_proto
    exported.ir_version = min(exported.ir_version, 10)
    mlp_session = ort_session(exported)
    input_name = mlp_session.get_inputs()[0].name
    xb, xb_t = test_batches[0], torch.from_numpy(test_batches[0])
    with torch.no_grad():
        runners = {
            "qcompiler int8 (TVM, integer-only)": (compiled_mlp, lambda: compiled_mlp(xb)),
            "torch float32": (lambda x: mlp(torch.from_numpy(x)).numpy(), lambda: mlp(xb_t)),
            "onnxruntime float32": (
                lambda x: mlp_session.run(None, {input_name: x})[0],
                lambda: mlp_session.run(None, {input_name: xb}),
            ),
        }
        mlp_rows = []
        for name, (predict, call) in runners.items():
            mlp_rows.append(
                {
                    "model": f"MLP 64-256-256-10 (b={batch})",
                    "runtime": name,
                    "accuracy": accuracy(predict, test_batches, target[test]),
                    "latency_us": median_seconds(call) * 1e6,
                }
            )
    _add_ratios(mlp_rows)
    mlp_rows[0]["compile_s"] = mlp_compile_s
    rows += mlp_rows

    print(f"threads: {THREADS}; latency = median of 30 x (mean of 5 calls); speedup = runtime latency / qcompiler")
    print_table(rows, ["model", "runtime", "accuracy", "latency_us", "qcompiler_speedup", "compile_s"])
    path = save("cnn_mlp", rows, {"threads": THREADS})
    print(f"saved {path}")


def _add_ratios(rows: list[dict]) -> None:
    ours = rows[0]["latency_us"]
    for row in rows:
        row["qcompiler_speedup"] = row["latency_us"] / ours


if __name__ == "__main__":
    main()
