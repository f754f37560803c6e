"""compile_causal_lm: one symbolic integer graph, an integer KV cache, prefill in chunks and decode steps.

The property that matters is exactness: a token decoded with the cache gets the logits that the prefill of the
whole sequence (the same integer model, no cache carried between calls) gives it, bit for bit; and the compiled
code agrees with the reference interpreter on the symbolic integer graph at every length it is built for.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers", reason="pip install -e '.[models]'")

import onnx_ir as ir
import torch

from qcompiler.dialect.reference import run_reference
from qcompiler.errors import CalibrationError, ModelLoadError, QCompilerError
from qcompiler.generation import CausalLM, ContextFullError, compile_causal_lm, decode_spans, keep_mask, prefill_spans
from qcompiler.ir.graph import specialize_dims
from qcompiler.passes.lower import float_ops_inside
from qcompiler.testing.zoo import decoder

pytestmark = pytest.mark.tvm

MAX_CONTEXT, CHUNK = 32, 8


@pytest.fixture(scope="module")
def llama() -> tuple[object, CausalLM, list[np.ndarray]]:
    model, calibration, held_out = decoder("llama")
    compiled = compile_causal_lm(model, calibration=calibration, max_context=MAX_CONTEXT, chunk=CHUNK, progress=False)
    return model, compiled, held_out


def _incremental(compiled: CausalLM, ids: np.ndarray, prompt: int) -> np.ndarray:
    compiled.reset()
    logits = [compiled.prefill(ids[:, :prompt])]
    logits += [compiled.decode_step(int(t))[None] for t in ids[0, prompt:]]
    return np.concatenate(logits)


def test_decode_with_the_cache_equals_the_whole_prefill_bit_for_bit(llama) -> None:
    _, compiled, held_out = llama
    ids = held_out[0]
    whole = compiled.logits(ids)  # chunks of 8, the last one padded: no cache carried within a chunk
    assert whole.shape[0] == ids.shape[1]
    for prompt in (1, 5, CHUNK, ids.shape[1] - 1):
        np.testing.assert_array_equal(_incremental(compiled, ids, prompt), whole)


def test_prefill_split_anywhere_gives_the_same_logits(llama) -> None:
    _, compiled, held_out = llama
    ids = held_out[1]
    whole = compiled.logits(ids)
    compiled.reset()
    parts = [compiled.prefill(ids[:, a:b]) for a, b in ((0, 3), (3, 12), (12, ids.shape[1]))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_generation_prefill_computes_the_last_logits_alone_and_exactly(llama) -> None:
    _, compiled, held_out = llama
    ids = held_out[1]
    whole = compiled.logits(ids)
    for a, b in ((0, 1), (0, 3), (0, CHUNK), (0, 13), (3, 12), (0, ids.shape[1])):
        compiled.reset()
        if a:
            compiled.prefill(ids[:, :a])
        last = compiled.prefill(ids[:, a:b], last_only=True)
        assert last.shape == (1, whole.shape[1])
        np.testing.assert_array_equal(last, whole[b - 1 : b])
    # the tail (the last MLP, the final norm, the LM head) runs on one row: its library is built for one
    rows = compiled.head_modules[1].input_names
    assert rows == [compiled.meta["head_input"]]


def test_a_step_runs_on_the_smallest_span_that_holds_the_cache(llama, monkeypatch) -> None:
    """Decode and prefill libraries per span (``span - 1`` and ``span - chunk`` slots): a step reads the span of
    the cache that holds what is filled, where it lies, not all ``max_context`` slots. Decode has a span between
    each two of prefill's (three quarters of the larger): a token reads at most 4/3 of what is filled."""
    _, compiled, held_out = llama
    spans = prefill_spans(CHUNK, MAX_CONTEXT)
    assert spans == [16, 32] and decode_spans(CHUNK, MAX_CONTEXT) == [16, 24, 32]
    assert sorted(compiled.decode_modules) == [15, 23, 31]
    assert sorted(compiled.prefill_modules) == [s - CHUNK for s in spans]
    ran: list[tuple[str, int]] = []
    for kind, modules in (("decode", compiled.decode_modules), ("prefill", compiled.prefill_modules)):
        for slots, module in modules.items():
            monkeypatch.setattr(module, "run", lambda feeds, m=module, k=kind, s=slots: ran.append((k, s)) or
                                type(m).run(m, feeds))  # fmt: skip
    ids = np.concatenate(held_out[:2], axis=1)
    assert ids.shape[1] >= 2 * CHUNK + 3
    compiled.reset()
    compiled.prefill(ids[:, :CHUNK])  # a chunk over no slots: the smallest span
    compiled.decode_step(int(ids[0, CHUNK]))  # 8 cached: the 15-slot library
    compiled.prefill(ids[:, CHUNK + 1 : 2 * CHUNK + 1])  # 9 cached: the 24-slot library (8 is too few)
    for token in ids[0, 2 * CHUNK + 1 : 2 * CHUNK + 3]:  # 17 and 18 cached: the 23-slot library
        compiled.decode_step(int(token))
    assert ran == [("prefill", 8), ("decode", 15), ("prefill", 24), ("decode", 23), ("decode", 23)]


def test_the_cache_is_integer_and_no_float_op_is_inside(llama) -> None:
    _, compiled, _ = llama
    assert all(d.kind == "i" for d in compiled.cache_dtypes)
    shapes, dtypes = compiled.layout.token_shapes, compiled.cache_dtypes
    expected = sum(int(np.prod(s)) * d.itemsize for s, d in zip(shapes, dtypes, strict=True))
    assert compiled.cache_bytes_per_token == expected
    assert float_ops_inside(ir.serde.deserialize_model(compiled.integer_model)) == []
    assert compiled.report["cache_bytes_per_token"] == compiled.cache_bytes_per_token


def test_weight_bytes_are_what_a_decode_step_streams(llama) -> None:
    """Every constant but the tables a Gather reads one row of per token (the embedding, the positions' RoPE
    tables): the decode floor's numerator."""
    model, compiled, _ = llama
    graph = ir.serde.deserialize_model(compiled.integer_model).graph
    sizes = {v.name: v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None}
    tables = [
        v.name for v in graph.initializers.values() if v.uses() and all(u.node.op_type == "Gather" for u in v.uses())
    ]
    embedding = model.config.vocab_size * model.config.hidden_size
    assert any(sizes[t] % embedding == 0 for t in tables)
    assert compiled.weight_bytes == sum(sizes.values()) - sum(sizes[t] for t in tables)


@pytest.mark.parametrize("length", [1, CHUNK])
def test_compiled_steps_agree_with_the_reference_interpreter(llama, length: int) -> None:
    _, compiled, held_out = llama
    compiled.reset()
    compiled.prefill(held_out[2][:, :5])  # a cache with 5 tokens in it
    module = compiled.decode_module if length == 1 else compiled.prefill_module
    slots = MAX_CONTEXT - length  # the past each step reads
    feeds = {
        "input_ids": held_out[2][:, 5 : 5 + length],
        "position_ids": np.arange(5, 5 + length)[None],
        "keep": keep_mask(5, length, slots),
        **{f"past_{i}": np.ascontiguousarray(c[:, :, :slots]) for i, c in enumerate(compiled.cache)},
    }
    whole = {**feeds, **{f"past_{i}": c for i, c in enumerate(compiled.cache)}}  # a library reads its span in it
    symbolic = ir.serde.deserialize_model(compiled.integer_model)
    seq, past = symbolic.graph.inputs[0].shape[1].value, symbolic.graph.inputs[3].shape[2].value
    static = ir.serde.serialize_model(specialize_dims(symbolic, {seq: length, past: slots}))
    expected = run_reference(static, feeds)
    got = module.run(whole)
    if length > 1:  # the prefill library stops at the logits' row-wise tail; its own library finishes them
        assert compiled.meta["head_input"] and sorted(compiled.head_modules) == [1, CHUNK]
        got = [compiled.head_modules[length].run({compiled.meta["head_input"]: got[0]})[0], *got[1:]]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_generate_greedy_is_the_argmax_of_recomputed_logits(llama) -> None:
    _, compiled, held_out = llama
    prompt = held_out[0][:, :6]
    out = compiled.generate(prompt, max_new_tokens=7)
    assert out.dtype == np.int64 and out.shape == (1, 13)
    np.testing.assert_array_equal(out[:, :6], prompt)
    sequence = prompt
    for _ in range(7):  # no cache across tokens: the whole sequence each time
        sequence = np.concatenate([sequence, [[int(np.argmax(compiled.logits(sequence)[-1]))]]], axis=1)
    np.testing.assert_array_equal(out, sequence)


def test_stream_stops_on_a_stop_token_and_sampling_is_seeded(llama) -> None:
    _, compiled, held_out = llama
    prompt = held_out[0][:, :4]
    greedy = list(compiled.stream(prompt, 6))
    assert len(greedy) == 6
    assert list(compiled.stream(prompt, 6, stop=greedy[2])) == greedy[:3]
    assert list(compiled.stream(prompt, 6, temperature=0.7, top_k=1)) == greedy  # top-1 sampling is greedy
    sampled = [list(compiled.stream(prompt, 8, temperature=1.5, top_p=0.9, seed=s)) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1]
    with pytest.raises(ValueError, match="top_p"):
        list(compiled.stream(prompt, 2, top_p=1.5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(compiled.stream(prompt, -1))


def test_integer_logits_stay_close_to_float(llama) -> None:
    model, compiled, held_out = llama
    ids = held_out[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(ids)).logits[0].numpy()
    ours = compiled.logits(ids)
    cosine = (reference * ours).sum(-1) / np.linalg.norm(reference, axis=-1) / np.linalg.norm(ours, axis=-1)
    assert cosine.min() > 0.97


def test_a_full_cache_is_refused_by_name(llama) -> None:
    _, compiled, held_out = llama
    compiled.reset()
    compiled.prefill(np.resize(held_out[0], (1, MAX_CONTEXT)))
    with pytest.raises(ContextFullError, match="max_context 32"):
        compiled.decode_step(1)
    compiled.reset()
    with pytest.raises(ContextFullError):
        compiled.prefill(np.zeros((1, MAX_CONTEXT + 1), np.int64))


def test_save_and_load_give_the_same_generation(llama, tmp_path) -> None:
    _, compiled, held_out = llama
    prompt = held_out[1][:, :5]
    expected = compiled.generate(prompt, 5)
    compiled.save(tmp_path / "lm")
    loaded = CausalLM.load(tmp_path / "lm")
    np.testing.assert_array_equal(loaded.generate(prompt, 5), expected)
    np.testing.assert_array_equal(loaded.logits(held_out[2]), compiled.logits(held_out[2]))
    with pytest.raises(QCompilerError, match="not a saved causal LM"):
        CausalLM.load(tmp_path)


def test_bad_arguments_are_refused_by_name(llama) -> None:
    model, calibration, _ = decoder("llama")
    with pytest.raises(ModelLoadError, match="causal LM"):
        compile_causal_lm(torch.nn.Linear(3, 3), calibration=calibration)
    with pytest.raises(CalibrationError, match="whole chunk"):
        compile_causal_lm(model, calibration=[c[:, :3] for c in calibration], max_context=32, chunk=8)
    with pytest.raises(CalibrationError, match="token ids"):
        compile_causal_lm(model, calibration=[np.zeros((1, 16), np.float32)], max_context=32, chunk=8)
    with pytest.raises(ValueError, match="chunk"):
        compile_causal_lm(model, calibration=calibration, max_context=32, chunk=64)
    with pytest.raises(QCompilerError, match="CPUs"):
        compile_causal_lm(model, "opencl", calibration=calibration, max_context=32, chunk=8)


def test_keep_mask_is_causal_over_filled_slots_and_windowed() -> None:
    keep = keep_mask(start=3, count=2, slots=5)[0, 0]
    expected = np.array([[1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(keep, expected)
    windowed = keep_mask(start=3, count=2, slots=5, window=2)[0, 0]
    np.testing.assert_array_equal(windowed, [[0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # qwen2: biases on q/k/v, tied embeddings
def test_w4a8_with_rotations_and_int4_weights_decodes_bit_for_bit(family: str) -> None:
    model, calibration, held_out = decoder(family)
    compiled = compile_causal_lm(model, calibration=calibration, recipe="w4a8", max_context=MAX_CONTEXT, chunk=CHUNK,
                                 progress=False)  # fmt: skip
    assert "qcompiler::QGemmInt4" in {f"{n.domain}::{n.op_type}" for n in compiled.integer_model.graph.node}
    # the rotations reach the symbolic-length graph (the region analyses read symbolic sequence axes): the residual
    # rotation and online Hadamards; the per-head rotation of V is refused by name (the cache would hold rotated
    # values that earlier steps wrote unrotated)
    passes = {r["name"]: r for r in compiled.report["passes"]}
    assert passes["RotateResidualPass"]["modified"] and passes["OnlineHadamardPass"]["modified"]
    assert not passes["RotateHeadsPass"]["modified"]
    ids = held_out[0]
    np.testing.assert_array_equal(_incremental(compiled, ids, 4), compiled.logits(ids))
