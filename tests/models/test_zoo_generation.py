"""Issue 16, acceptance 3: the decoder families of the zoo generate with an integer KV cache.

Each family of :data:`qcompiler.testing.zoo.DECODERS` (transformers' own classes, random weights, small odd sizes)
compiles with :func:`qcompiler.compile_causal_lm`, and a token decoded with the cache gets the logits that the
prefill of the whole sequence (the same integer model, nothing carried between calls) gives it, bit for bit;
or the family is refused by a named, user-facing error listed, with its reason, in EXPECTED_REFUSALS.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers", reason="pip install -e '.[models]'")

import torch

from qcompiler.errors import ModelLoadError, QCompilerError
from qcompiler.generation import compile_causal_lm
from qcompiler.testing.zoo import DECODERS, decoder

pytestmark = [pytest.mark.slow, pytest.mark.tvm]

MAX_CONTEXT, CHUNK, PROMPT = 32, 8, 5
#: logits of the integer model against float (random weights: a loose sanity floor; exactness is the test)
COSINE_FLOOR = 0.95

#: family -> why its cached step is refused (by ModelLoadError or UnsupportedOpError, named)
EXPECTED_REFUSALS = {
    "bloom": "ALiBi built from a 2-D attention mask: the model cannot take the 4-D mask of a cached step",
    "mpt": "its masked_fill of the ALiBi scores leaves a float Where the integer path does not lower",
    "gpt-neo": "its local-attention layers specialise the past length at export (no symbolic cache length)",
}


@pytest.mark.parametrize("family", DECODERS)
def test_family_decodes_with_the_cache_bit_for_bit_or_is_refused_by_name(family: str) -> None:
    model, calibration, held_out = decoder(family)
    try:
        compiled = compile_causal_lm(model, calibration=calibration, max_context=MAX_CONTEXT, chunk=CHUNK,
                                     progress=False)  # fmt: skip
    except (ModelLoadError, QCompilerError) as refusal:
        assert family in EXPECTED_REFUSALS, f"{family} refused, not listed in EXPECTED_REFUSALS: {refusal}"
        assert "compile" in str(refusal) or "node" in str(refusal)  # says what to do, or names the node
        return
    assert family not in EXPECTED_REFUSALS, f"{family} compiles now: take it off EXPECTED_REFUSALS"
    for ids in held_out[:2]:
        whole = compiled.logits(ids)
        compiled.reset()
        steps = [compiled.prefill(ids[:, :PROMPT])] + [compiled.decode_step(int(t))[None] for t in ids[0, PROMPT:]]
        np.testing.assert_array_equal(np.concatenate(steps), whole, err_msg=f"{family}: cached != whole prefill")
        compiled.reset()  # generation's prefill: the logits' row-wise tail on the last row alone
        last = compiled.prefill(ids, last_only=True)
        np.testing.assert_array_equal(last, whole[-1:], err_msg=f"{family}: last-row prefill != whole prefill")
    assert compiled.head_modules, f"{family}: no row-wise tail found before the logits (row_tail.py)"
    with torch.no_grad():
        reference = model(torch.from_numpy(held_out[0])).logits[0].numpy()
    ours = compiled.logits(held_out[0])
    cosine = float((reference * ours).sum() / np.linalg.norm(reference) / np.linalg.norm(ours))
    print(f"\n{family}: {compiled.cache_dtypes[0]} cache, {compiled.cache_bytes_per_token} B/token, cos {cosine:.4f}")
    assert cosine >= COSINE_FLOOR
    assert all(d.kind == "i" for d in compiled.cache_dtypes)
