"""Latency and accuracy: integer-only qcompiler code vs the float model in torch and onnxruntime.

Models: the trained MNIST CNN (ONNX model zoo) on scikit-learn digits, batch 1; and an MLP trained here on
scikit-learn digits (64 -> 256 -> 256 -> 10), batch 64. Every row is measured in this run, same threads.

    make bench            # or: .venv/bin/python benchmarks/bench_cnn_mlp.py

``--conv-layouts`` instead times one QConv per shape (the MNIST CNN's two and ResNet-like ones, and a pair of
consecutive 3x3 convolutions) built with ``conv_layout="NCHW"`` and ``"NHWC"`` (NHWC times include the permutes at
the graph's NCHW boundary), the minimum over interleaved rounds of TVM's median, and saves
benchmarks/results/conv_layouts.json: the measurements ``conv_layout="auto"`` follows.
"""

from __future__ import annotations

import argparse
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


#: (name, input NCHW, weight [N, C, KH, KW], attributes, convolutions in a chain)
CONV_SHAPES = [
    ("MNIST conv1", (1, 1, 28, 28), (8, 1, 5, 5), {"pads": [2, 2, 2, 2]}, 1),
    ("MNIST conv2", (1, 8, 14, 14), (16, 8, 5, 5), {"pads": [2, 2, 2, 2]}, 1),
    ("ResNet stem 7x7/2", (1, 3, 224, 224), (64, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}, 1),
    ("3x3 64 @56", (1, 64, 56, 56), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}, 1),
    ("3x3 128 @28", (1, 128, 28, 28), (128, 128, 3, 3), {"pads": [1, 1, 1, 1]}, 1),
    ("1x1 256 @14", (1, 256, 14, 14), (256, 256, 1, 1), {}, 1),
    ("3x3 128/2 @56", (1, 64, 56, 56), (128, 64, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, 1),
    ("2 x 3x3 64 @56", (1, 64, 56, 56), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}, 2),
]


def conv_model(x_shape, w_shape, attrs: dict, chain: int) -> onnx.ModelProto:
    """``chain`` QConv nodes (ReLU clamp, per-channel requantize) on one NCHW input."""
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.dialect import DOMAIN

    rng = np.random.default_rng(0)
    nodes, inits, name = [], [], "x"
    for i in range(chain):
        out_c = w_shape[0]
        weight = rng.integers(-127, 128, (out_c, w_shape[1] if i == 0 else out_c, *w_shape[2:])).astype(np.int8)
        params = {
            f"w{i}": weight,
            f"b{i}": rng.integers(-3000, 3000, out_c).astype(np.int32),
            f"m{i}": rng.integers(1 << 30, 1 << 31, out_c).astype(np.int32),
            f"s{i}": np.full(out_c, 40, np.int32),
        }
        inits += [numpy_helper.from_array(v, k) for k, v in params.items()]
        nodes.append(helper.make_node("QConv", [name, *params], [f"y{i}"], domain=DOMAIN, lo=0, **attrs))
        name = f"y{i}"
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.INT8, list(x_shape))],
        [helper.make_tensor_value_info(name, TensorProto.INT8, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])


def conv_layouts(rounds: int = 3) -> None:
    """Each shape in both im2col layouts: the minimum over ``rounds`` interleaved rounds of TVM's median time."""
    from qcompiler.backends.tvm import build

    rows = []
    for name, x_shape, w_shape, attrs, chain in CONV_SHAPES:
        model = conv_model(x_shape, w_shape, attrs, chain)
        feeds = {"x": np.random.default_rng(1).integers(-128, 128, x_shape).astype(np.int8)}
        modules = {layout: build(model, {"x": list(x_shape)}, conv_layout=layout) for layout in ("NCHW", "NHWC")}
        outputs = [m.run(feeds)[0] for m in modules.values()]
        assert np.array_equal(*outputs), f"{name}: the layouts disagree"
        best = dict.fromkeys(modules, float("inf"))
        for _ in range(rounds):
            for layout, module in modules.items():
                best[layout] = min(best[layout], module.time(feeds, number=20, repeat=5))
        macs = chain * int(np.prod(outputs[0].shape)) * int(np.prod(w_shape[1:]))
        rows.append({"shape": name, "input": "x".join(map(str, x_shape)), "weight": "x".join(map(str, w_shape)),
                     "MMACs": macs / 1e6, "NCHW_us": best["NCHW"] * 1e6, "NHWC_us": best["NHWC"] * 1e6,
                     "NHWC_speedup": best["NCHW"] / best["NHWC"]})  # fmt: skip
    print(f"threads: {THREADS}; min over {rounds} rounds of the median of 5 x 20 calls")
    print_table(rows, ["shape", "input", "weight", "MMACs", "NCHW_us", "NHWC_us", "NHWC_speedup"])
    print(f"saved {save('conv_layouts', rows, {'threads': THREADS})}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv-layouts", action="store_true", help="time QConv in both im2col layouts instead")
    if parser.parse_args().conv_layouts:
        conv_layouts()
    else:
        main()
