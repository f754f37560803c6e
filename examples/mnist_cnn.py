"""Demo: quantize the trained MNIST CNN and compile it to integer-only CPU code, then compare with float.

Real model (ONNX model zoo mnist-8, shipped in qcompiler/testing/assets/mnist-conv), real images (scikit-learn's
digits, upscaled
and centred like MNIST). Prints accuracy and latency of the integer-only code against the float model.

    make demo        # or: .venv/bin/python examples/mnist_cnn.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort

import qcompiler
from qcompiler.testing.data import digits_28x28, mnist_model_path, mnist_test_vector


def median_latency(fn, repeats: int = 200) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    images, labels = digits_28x28()
    calibration = [images[i : i + 1] for i in range(1, len(images), 9)]  # 200 digits, every 9th
    print(f"model: {mnist_model_path()}")
    print(f"data: {len(images)} real handwritten digits (scikit-learn), {len(calibration)} used for calibration")

    start = time.perf_counter()
    compiled = qcompiler.compile(str(mnist_model_path()), target="llvm", calibration=calibration, recipe="w8a8")
    print(f"compiled to integer-only CPU code in {time.perf_counter() - start:.2f}s ({compiled.report['target']})")
    print("integer graph:", ", ".join(f"{op} x{n}" for op, n in compiled.report["ops"].items()))

    session = ort.InferenceSession(str(mnist_model_path()), providers=["CPUExecutionProvider"])
    float_pred = np.array([session.run(None, {"Input3": images[i : i + 1]})[0].argmax() for i in range(len(images))])
    int_pred = np.array([compiled(images[i : i + 1]).argmax() for i in range(len(images))])
    float_acc, int_acc = np.mean(float_pred == labels), np.mean(int_pred == labels)

    x, expected = mnist_test_vector()
    print(f"shipped test vector: expected class {expected.argmax()}, integer-only code says {compiled(x).argmax()}")

    x0 = images[:1]
    t_int = median_latency(lambda: compiled(x0))
    t_float = median_latency(lambda: session.run(None, {"Input3": x0}))
    print()
    print(f"{'':28} {'accuracy':>9} {'latency (us)':>13}")
    print(f"{'float32 (onnxruntime)':28} {float_acc:>9.2%} {t_float * 1e6:>13.1f}")
    print(f"{'int8 integer-only (TVM)':28} {int_acc:>9.2%} {t_int * 1e6:>13.1f}")
    print(
        f"accuracy change {100 * (int_acc - float_acc):+.2f} points; integer/float latency ratio {t_int / t_float:.2f}"
    )
    print(f"agreement with float predictions: {np.mean(int_pred == float_pred):.2%}")


if __name__ == "__main__":
    main()
