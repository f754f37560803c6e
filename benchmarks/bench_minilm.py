"""all-MiniLM-L6-v2, batch 8 x 32 tokens: qcompiler W8A8 integer-only against the float model and onnxruntime's
dynamic int8 model (issue 5, acceptance 2). Latency (median, 2 threads, same run) and accuracy (mean and minimum
cosine of the sentence embeddings to float32 over 128 WikiText-2 sentences, calibration on 128 others); plus
qcompiler's compile time (export, calibration, passes, build).

    .venv/bin/python benchmarks/bench_minilm.py

Prints the table and saves benchmarks/results/minilm.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, onnxruntime_float_and_dynamic, print_table, save

import qcompiler
from qcompiler.testing.encoders import CALIBRATION_OFFSET, load_minilm, sentence_embedding

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
SENTENCES = 128


def main() -> None:
    torch.set_num_threads(THREADS)
    minilm = load_minilm()
    evaluation = minilm.batches(0, SENTENCES)
    calibration = minilm.batches(CALIBRATION_OFFSET, SENTENCES)
    first = evaluation[0]
    start = time.perf_counter()
    model = qcompiler.ir.load(
        minilm.encoder_module(), example_inputs=(torch.from_numpy(first["ids"]), torch.from_numpy(first["mask"]))
    )
    export_s = time.perf_counter() - start
    session, dynamic = onnxruntime_float_and_dynamic(model, THREADS)  # before compile: the float graph
    start = time.perf_counter()
    compiled = qcompiler.compile(model, "llvm", calibration=calibration, recipe="w8a8-percentile", progress=False)
    compile_s = export_s + time.perf_counter() - start

    def torch_run(feeds):
        with torch.no_grad():
            return minilm.model(
                input_ids=torch.from_numpy(feeds["ids"]), attention_mask=torch.from_numpy(feeds["mask"])
            ).last_hidden_state.numpy()

    runs = {
        "qcompiler W8A8 integer-only": lambda feeds: compiled(feeds["ids"], feeds["mask"]),
        "torch float32": torch_run,
        "onnxruntime float32": lambda feeds: session.run(None, feeds)[0],
        "onnxruntime quantize_dynamic int8": lambda feeds: dynamic.run(None, feeds)[0],
    }
    reference = [sentence_embedding(runs["torch float32"](b), b["mask"]) for b in evaluation]
    rows = []
    for name, run in runs.items():
        cosines = np.concatenate(
            [(ref * sentence_embedding(run(b), b["mask"])).sum(1) for ref, b in zip(reference, evaluation, strict=True)]
        )
        seconds = median_seconds(lambda run=run: run(first), warmup=5, repeats=20, inner=3)
        rows.append({"impl": name, "ms": round(seconds * 1e3, 2), "cosine_mean": round(float(cosines.mean()), 4),
                     "cosine_min": round(float(cosines.min()), 4)})  # fmt: skip
    ours = rows[0]["ms"]
    for row in rows:
        row["qcompiler_speedup"] = round(row["ms"] / ours, 2)
    print_table(rows, ["impl", "ms", "qcompiler_speedup", "cosine_mean", "cosine_min"])
    print(f"qcompiler compile time (export, calibration on {SENTENCES} sentences, passes, build): {compile_s:.1f}s")
    path = save(
        "minilm", rows, {"threads": THREADS, "batch": list(first["ids"].shape), "compile_s": round(compile_s, 1)}
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
