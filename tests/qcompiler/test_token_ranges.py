"""Issue 18's evaluation split (qcompiler.testing.llm): each range of WikiText-2 test tokens has one use, the ranges
are disjoint and inside the text, and the perplexity protocol scores exactly the range it is given."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qcompiler.testing.data import WIKITEXT_TEST
from qcompiler.testing.llm import REPORTED, SPLITS, WINDOW, perplexity

#: SmolLM2's tokenizer gives 312,144 tokens; the text's characters bound it from above (a token is >= 1 character)
MIN_TOKENS = 300_000


def test_ranges_are_disjoint_and_inside_the_text() -> None:
    assert len(WIKITEXT_TEST.read_text(encoding="utf-8")) > MIN_TOKENS
    for (name_a, a), (name_b, b) in itertools.combinations(SPLITS.items(), 2):
        assert a.start + a.count <= b.start or b.start + b.count <= a.start, (name_a, name_b)
    assert all(r.start + r.count <= MIN_TOKENS and r.count % WINDOW == 0 for r in SPLITS.values())
    assert set(REPORTED) == {"evaluation", "held-out"} and SPLITS["evaluation"].start == 0


def _certain_after(token: int, vocab: int = 8):
    """A step whose logits are uniform over ``vocab`` classes, but certain that ``token`` follows ``token``."""

    def step(ids: np.ndarray) -> np.ndarray:
        logits = np.zeros((1, ids.shape[1], vocab))
        logits[0, ids[0] == token, token] = 1e4
        return logits

    return step


def test_perplexity_scores_the_range_it_is_given() -> None:
    """Token 7 fills the held-out range and cycles 0..6 elsewhere: a step certain that 7 follows 7 has perplexity 1
    on the held-out range alone and 8 (uniform over 8 classes) on every other range."""
    held = SPLITS["held-out"]
    tokens = np.arange(held.start + held.count + WINDOW, dtype=np.int64) % 7
    tokens[held.start : held.start + held.count] = 7
    step = _certain_after(7)
    assert perplexity(step, tokens, split=held) == pytest.approx(1.0)
    assert perplexity(step, tokens, split=SPLITS["evaluation"]) == pytest.approx(8.0)
    assert perplexity(step, tokens, split=SPLITS["validation"]) == pytest.approx(8.0)
    assert perplexity(step, tokens, count=WINDOW, split=held) == pytest.approx(1.0)


def test_perplexity_refuses_more_tokens_than_its_range_holds() -> None:
    tokens = np.arange(10_000, dtype=np.int64)
    with pytest.raises(ValueError, match="exceed the 4096"):
        perplexity(_certain_after(7), tokens, count=8192)
