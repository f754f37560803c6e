"""Float-exact transforms (norm folding, residual and per-head rotations) and the region analysis they rely on:
property-tested on generated transformer blocks in float64 (equivalence to 1e-9, honest ``modified``,
idempotence), with the regions each kind of block must (and must not) offer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings

from qcompiler.dialect.hadamard import hadamard_structure, hadamard_transform, split_sylvester, sylvester
from qcompiler.ir.graph import const_array
from qcompiler.ir.regions import hadamard_sites, report
from qcompiler.passes.transform import FoldNormGainsPass, OnlineHadamardPass, RotateHeadsPass, RotateResidualPass
from qcompiler.passes.transform.hadamard import (
    NoHadamardError,
    hadamard,
    has_hadamard,
    online_hadamard,
    random_hadamard,
    random_orthogonal,
    rotation,
)
from qcompiler.testing import GeneratedModel, assert_float_exact_pass, transformer_models

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- Hadamard matrices ------------------------------------------------------------------------------------


def test_every_constructible_order_up_to_512_is_hadamard() -> None:
    orders = [n for n in range(1, 513) if has_hadamard(n)]
    for n in orders:
        h = hadamard(n)
        assert set(np.unique(h)) <= {-1, 1}
        h = h.astype(np.float64)
        np.testing.assert_array_equal(h @ h.T, n * np.eye(n), err_msg=f"order {n}")
    # every power of two, the Paley orders and the transformer sizes that need them
    assert {1, 2, 4, 12, 20, 28, 36, 44, 60, 108, 140, 384} <= set(orders)
    assert len(orders) >= 100


@pytest.mark.parametrize("n", [576, 768, 1536, 2304, 3072, 4096])
def test_transformer_widths_have_hadamard_matrices(n: int) -> None:
    h = hadamard(n).astype(np.float64)  # +-1 sums up to 4096: exact in float64, and BLAS-fast
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [3, 6, 52, 172])
def test_orders_without_construction_are_refused_by_name(n: int) -> None:
    with pytest.raises(NoHadamardError, match=rf"order {n}\b.*rotation='random'"):
        hadamard(n)
    q = rotation(n, "hadamard-or-random", seed=1)  # the documented fallback
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


def test_rotations_are_orthogonal_and_seeded() -> None:
    for q in (random_hadamard(576, seed=3), random_orthogonal(40, seed=3)):
        np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=1e-12)
    np.testing.assert_array_equal(random_hadamard(64, 5), random_hadamard(64, 5))
    assert not np.array_equal(random_hadamard(64, 5), random_hadamard(64, 6))
    with pytest.raises(ValueError, match="rotation kind 'givens'"):
        rotation(8, "givens")


@pytest.mark.parametrize(("n", "block"), [(2, 1), (64, 1), (12, 12), (20, 20), (576, 36), (1536, 12), (384, 12)])
def test_online_hadamard_has_the_fast_structure(n: int, block: int) -> None:
    matrix = online_hadamard(n)
    assert np.array_equal(matrix @ matrix.T, n * np.eye(n, dtype=np.int64))
    structure = hadamard_structure((matrix / np.sqrt(n)).astype(np.float32))
    assert structure is not None
    scale, h = structure
    assert h.shape == (block, block) and abs(scale - n**-0.5) < 1e-7
    x = np.random.default_rng(n).integers(-(2**15), 2**15, size=(3, n))
    assert np.array_equal(hadamard_transform(x, h), x @ matrix)


def test_hadamard_structure_rejects_what_is_not_one() -> None:
    rng = np.random.default_rng(0)
    assert hadamard_structure(rng.standard_normal((16, 16))) is None
    signs = sylvester(4).astype(np.float64)
    assert hadamard_structure(signs / 4) is not None
    flipped = signs.copy()
    flipped[3, 5] *= -1  # +-1 entries, but no longer S (x) h with an orthogonal block
    assert hadamard_structure(flipped / 4) is None
    assert split_sylvester(np.ones((6, 6), dtype=np.int64)) is not None  # kron(S_2, ones(3)): a block...
    assert hadamard_structure(np.ones((6, 6))) is None  # ...that is not a Hadamard matrix
    with pytest.raises(NoHadamardError, match="order 6"):
        online_hadamard(6)
    with pytest.raises(ValueError, match="block order"):
        hadamard_transform(np.zeros((2, 24), dtype=np.int64), np.ones((5, 5), dtype=np.int8))


# -- property tests on generated transformers -------------------------------------------------------------


def _parts(generated: GeneratedModel) -> list[str]:
    return generated.description.split(":", 1)[1].split(",")


def _folded(generated: GeneratedModel) -> ir.Model:
    model = ir.serde.deserialize_model(generated.model)
    FoldNormGainsPass()(model)
    return model


@PROPERTY
@given(transformer_models())
def test_fold_norm_gains_is_exact(generated: GeneratedModel) -> None:
    after, modified = assert_float_exact_pass(FoldNormGainsPass, generated.model, generated.inputs(2))
    pre_norm = "pre-norm" in generated.description
    if pre_norm and "bias" in _parts(generated):  # every norm feeds linears with biases
        assert modified
        assert all(region.weightless for region in report(after).norms), generated.description
    if not pre_norm:  # post-norm: the next residual Add reads every norm but the last, whose gain alone folds
        layers = int(generated.description.rsplit("layers=", 1)[1])
        parts = _parts(generated)
        kept = [region for region in report(after).norms if not region.weightless]
        shift_stuck = "layer" in parts and "no-bias" in parts  # a LayerNorm shift needs a bias in its readers
        assert len(kept) == 2 * layers - (0 if shift_stuck else 1), generated.description
        assert sum(any("(Add) reads it" in b for b in region.blockers) for region in kept) == 2 * layers - 1


@PROPERTY
@given(transformer_models())
def test_rotate_residual_is_exact(generated: GeneratedModel) -> None:
    folded = _folded(generated)
    streams = report(folded).streams
    rotatable = "rms" in generated.description and "pre-norm" in generated.description
    after, modified = assert_float_exact_pass(RotateResidualPass, folded, generated.inputs(2))
    assert modified == rotatable, (generated.description, [s.blockers for s in streams])
    if "layer" in _parts(generated) and "pre-norm" in generated.description:
        assert any("LayerNormalization" in b for s in streams for b in s.blockers)
    if rotatable:  # the embedding, every writer and every reader moved; the linears all covered
        (stream,) = streams
        layers = int(generated.description.rsplit("layers=", 1)[1])
        assert len(stream.writers) == 2 * layers and len(stream.embeddings) == 1
        mlp_inputs = 2 if "swiglu" in generated.description else 1  # gate and up, or the one up projection
        assert len(stream.all_readers) == (3 + mlp_inputs) * layers + 1  # q, k, v and the MLP per layer; the head
        assert after.metadata_props["qcompiler.rotate_residual"] == "hadamard-or-random:0"


@PROPERTY
@given(transformer_models())
def test_rotate_heads_is_exact(generated: GeneratedModel) -> None:
    layers = int(generated.description.rsplit("layers=", 1)[1])
    pairs = report(ir.serde.deserialize_model(generated.model)).heads
    assert len(pairs) == layers and not any(p.blockers for p in pairs), generated.description  # GQA included
    _, modified = assert_float_exact_pass(RotateHeadsPass, generated.model, generated.inputs(2))
    assert modified


@PROPERTY
@given(transformer_models())
def test_layernorm_to_rmsnorm_is_exact_and_opens_the_stream_to_rotation(generated: GeneratedModel) -> None:
    """Pre-norm LayerNorm blocks: the centred writers make every LayerNorm an RMSNorm (float64 exact), after which
    the residual rotation applies; RMSNorm and post-norm blocks are left alone, with the reason kept."""
    from qcompiler.passes.transform import LayerNormToRMSNormPass

    folded = _folded(generated)
    applies = "layer" in _parts(generated) and "pre-norm" in generated.description
    after, modified = assert_float_exact_pass(LayerNormToRMSNormPass, folded, generated.inputs(2))
    assert modified == applies, generated.description
    ops = [n.op_type for n in after.graph]
    if applies:
        assert "LayerNormalization" not in ops and after.opset_imports[""] >= 23
        layers = int(generated.description.rsplit("layers=", 1)[1])
        assert ops.count("RMSNormalization") == 2 * layers + 1
        if "bias" in _parts(generated):  # gains and shifts folded first: the stream is now rotatable
            assert_float_exact_pass(RotateResidualPass, after, generated.inputs(1))
            (stream,) = report(after).streams
            assert not stream.blockers, stream.blockers
    elif "layer" in _parts(generated):  # post-norm: linears read the stream directly
        probe = LayerNormToRMSNormPass()
        probe(ir.serde.deserialize_model(ir.serde.serialize_model(folded)))
        assert any("reads the stream directly" in b for bs in probe.skipped.values() for b in bs), probe.skipped


@settings(max_examples=40, deadline=None)
@given(transformer_models())
def test_all_rotations_together_are_exact_with_random_orthogonal(generated: GeneratedModel) -> None:
    folded = _folded(generated)
    after, _ = assert_float_exact_pass(lambda: RotateResidualPass("random", seed=7), folded, generated.inputs(1))
    assert_float_exact_pass(lambda: RotateHeadsPass("random", seed=7), after, generated.inputs(1))


def _has_online(n: int | None) -> bool:
    try:
        online_hadamard(n or 0)
    except NoHadamardError:
        return False
    return True


@PROPERTY
@given(transformer_models())
def test_online_hadamard_is_exact(generated: GeneratedModel) -> None:
    layers = int(generated.description.rsplit("layers=", 1)[1])
    sites = hadamard_sites(ir.serde.deserialize_model(generated.model).graph)
    assert sorted(site.kind for site in sites) == ["attention"] * layers + ["mlp"] * layers, generated.description
    assert not any(site.blockers for site in sites)
    expected = sum(_has_online(site.size) for site in sites)
    after, modified = assert_float_exact_pass(
        lambda: OnlineHadamardPass(("mlp", "attention")), generated.model, generated.inputs(2)
    )
    assert modified == (expected > 0)
    inserted = [
        node
        for node in after.graph
        if node.op_type == "MatMul"
        and (weight := const_array(node.inputs[1])) is not None
        and hadamard_structure(weight) is not None
    ]
    assert len(inserted) == expected, generated.description


@PROPERTY
@given(transformer_models())
def test_qk_rotation_after_rope_is_exact(generated: GeneratedModel) -> None:
    """R3: ``Q H`` and ``K H`` before every score product (RoPE, GQA and masks included), scores unchanged."""
    from qcompiler.ir.regions import score_sites

    layers = int(generated.description.rsplit("layers=", 1)[1])
    sites = score_sites(ir.serde.deserialize_model(generated.model).graph)
    assert len(sites) == layers and not any(site.blockers for site in sites), [s.blockers for s in sites]
    expected = 2 * sum(_has_online(site.head_dim) for site in sites)
    after, modified = assert_float_exact_pass(lambda: OnlineHadamardPass(("qk",)), generated.model, generated.inputs(2))
    assert modified == (expected > 0)
    inserted = [n for n in after.graph if n.metadata_props.get("qcompiler.online_hadamard") == "qk"]
    assert len(inserted) == expected, generated.description


def test_online_hadamard_rejects_unknown_targets() -> None:
    with pytest.raises(ValueError, match="targets: expected 'mlp', 'attention' and/or 'qk'"):
        OnlineHadamardPass(("down",))


# -- regions on a hand-written graph ------------------------------------------------------------------------


def test_region_report_names_what_blocks_a_rotation() -> None:
    """A norm read by a non-linear op blocks its stream, and the report says which node and why."""
    from hypothesis import find

    generated = find(transformer_models(), lambda g: "rms" in g.description and "pre-norm" in g.description)
    model = _folded(generated)
    norm = next(n for n in model.graph if n.op_type == "RMSNormalization")
    tap = ir.node("Relu", [norm.outputs[0]], name="debug_tap")
    model.graph.append(tap)
    model.graph.outputs.append(tap.outputs[0])
    tap.outputs[0].name = "tap"
    text = report(model).format()
    assert "blocked: debug_tap (Relu) reads it and is not a linear with a constant weight" in text
    result = RotateResidualPass()(model)
    assert not result.modified
