"""SmolLM2-135M prefill of a 512-token prompt: qcompiler W8A8 integer-only (recipe ``w8a8-llm``) and W4A8
integer-only (recipe ``w4a8``: int4 weights, online Hadamards) against torch float32, onnxruntime float32 and
onnxruntime's ``quantize_dynamic`` int8 model (issue 5, acceptance 3).

Every row is measured in this run with the same threads: prefill tokens per second (512 over the median
latency of one forward pass of the whole prompt, logits for every position, no KV cache), and the accuracy of
each on the prompt itself (perplexity of the 512 WikiText-2 test tokens it scores, and the fraction of positions
whose greedy next token agrees with torch float32). Plus qcompiler's compile times (export, calibration on 4
windows, passes, build; GPTQ for W4A8).

    .venv/bin/python benchmarks/bench_smollm2_prefill.py

Prints the table and saves benchmarks/results/smollm2_prefill.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, onnxruntime_float_and_dynamic, print_table, save

import qcompiler
from qcompiler.testing.llm import WINDOW, ModelUnavailableError, load_smollm2, perplexity

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
CALIBRATION_WINDOWS = 4


def main() -> None:
    import torch

    torch.set_num_threads(THREADS)
    try:
        smol = load_smollm2()
    except ModelUnavailableError as missing:
        raise SystemExit(f"{missing} (make test installs everything)") from None
    prompt = smol.tokens[:WINDOW][None]
    calibration = smol.calibration(CALIBRATION_WINDOWS)
    example = (torch.from_numpy(prompt),)

    start = time.perf_counter()
    model = qcompiler.ir.load(smol.logits_module(), example_inputs=example)
    export_s = time.perf_counter() - start
    session, dynamic = onnxruntime_float_and_dynamic(model, THREADS)  # before compile: the float graph
    float_graph = ir.serde.serialize_model(model)  # compile rewrites the model it is given
    compile_s = {}
    compiled = {}
    for label, recipe, source in (("W8A8", "w8a8-llm", model), ("W4A8", "w4a8", float_graph)):
        start = time.perf_counter()
        compiled[label] = qcompiler.compile(source, "llvm", calibration=calibration, recipe=recipe, progress=False)
        compile_s[label] = export_s + time.perf_counter() - start
    input_name = session.get_inputs()[0].name

    runs = {
        "qcompiler W8A8 integer-only": lambda ids: compiled["W8A8"](ids),
        "qcompiler W4A8 integer-only": lambda ids: compiled["W4A8"](ids),
        "torch float32": smol.float_step,
        "onnxruntime float32": lambda ids: session.run(None, {input_name: ids})[0],
        "onnxruntime quantize_dynamic int8": lambda ids: dynamic.run(None, {input_name: ids})[0],
    }
    reference = runs["torch float32"](prompt)[0].argmax(-1)
    rows = []
    for name, run in runs.items():
        logits = np.asarray(run(prompt))
        seconds = median_seconds(lambda run=run: run(prompt), warmup=2, repeats=7, inner=1)
        rows.append({
            "impl": name, "ms": round(seconds * 1e3, 1), "tokens_per_s": round(WINDOW / seconds, 1),
            "prompt_ppl": round(perplexity(lambda _ids, logits=logits: logits, prompt[0], count=WINDOW), 2),
            "top1_agree": round(float((logits[0].argmax(-1) == reference).mean()), 4),
        })  # fmt: skip
    ours = rows[0]["tokens_per_s"]
    for row in rows:
        row["qcompiler_speedup"] = round(ours / row["tokens_per_s"], 2)
    print_table(rows, ["impl", "ms", "tokens_per_s", "qcompiler_speedup", "prompt_ppl", "top1_agree"])
    for label, seconds in compile_s.items():
        print(f"qcompiler {label} compile time (export, calibration on {CALIBRATION_WINDOWS} windows, passes, build): "
              f"{seconds:.1f}s")  # fmt: skip
    extra = {"threads": THREADS, "prompt_tokens": WINDOW, "compile_s": {k: round(v, 1) for k, v in compile_s.items()}}
    path = save("smollm2_prefill", rows, extra)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
