"""Transforms chosen from calibration data: AWQ's scale search and migration, its output-error clipping search,
and MambaQuant's KLT-enhanced rotation. The transforms are float-exact whatever the data (property-tested in
float64 on generated transformer blocks, with idempotence and an honest ``modified`` flag); the data decide only
which exact transform, and the tests check that the choice does what it is for (a smaller quantized output
error, channel variances made equal)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings

from qcompiler.calibrate import observe
from qcompiler.errors import CalibrationError, PassFailedError
from qcompiler.ir.regions import report, scale_sites
from qcompiler.passes.quantize.weights import WeightQuantSpec, gptq, hessian, quantize_rtn
from qcompiler.passes.transform import (
    ActivationAwareScalePass,
    FoldNormGainsPass,
    RotateHeadsPass,
    RotateResidualPass,
)
from qcompiler.passes.transform.awq import group_error, search_scales
from qcompiler.passes.transform.hadamard import klt_rotation
from qcompiler.pipeline import Pipeline
from qcompiler.testing import GeneratedModel, assert_float_exact_pass, transformer_models

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _statistics(model: ir.Model | bytes, generated: GeneratedModel):
    graph = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(generated.model)
    return observe(graph, generated.inputs(4, offset=1), progress=False, hessians=True)


def _salient_inputs(rows: int = 512, width: int = 32, seed: int = 0) -> np.ndarray:
    """Activations with a few salient channels (10-40x the others), as LLM linear inputs have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, width))
    x[:, [3, 17, 29]] *= [40.0, 15.0, 10.0]
    return x


# -- AWQ ------------------------------------------------------------------------------------------------------


def test_group_error_is_the_output_error_on_the_calibration_inputs() -> None:
    """tr(dW^T H dW) with H = 2 X^T X / N equals 2 ||X dW||^2 / N: the search needs no activations kept."""
    x = _salient_inputs()
    w = np.random.default_rng(1).standard_normal((32, 24))
    spec = WeightQuantSpec(4, group_size=8)
    s = np.random.default_rng(2).uniform(0.5, 2.0, 32)
    delta = quantize_rtn(s[:, None] * w, spec).dequantize() / s[:, None] - w
    direct = 2.0 * float(((x @ delta) ** 2).sum()) / len(x)
    assert group_error([w], hessian(x), s, spec) == pytest.approx(direct, rel=1e-9)


def test_awq_search_shrinks_the_quantized_output_error_on_salient_channels() -> None:
    x = _salient_inputs()
    w = np.random.default_rng(3).standard_normal((32, 64))
    spec = WeightQuantSpec(4, group_size=16)
    scales, alpha, errors = search_scales([w], hessian(x), np.abs(x).mean(axis=0), spec, grid=20)
    assert set(errors) == {k / 20 for k in range(21)} and errors[alpha] == min(errors.values())
    assert alpha > 0.0 and scales[3] == scales.max()  # the most salient channel gets the largest scale
    # measured on held-out activations from the same distribution: the scaled group quantizes better
    held = _salient_inputs(seed=9)
    plain = held @ quantize_rtn(w, spec).dequantize()
    awq = (held / scales) @ quantize_rtn(scales[:, None] * w, spec).dequantize()
    assert np.linalg.norm(awq - held @ w) < 0.6 * np.linalg.norm(plain - held @ w)  # measured 0.28 (a = 0.4)


@PROPERTY
@given(transformer_models())
def test_awq_scales_are_exact(generated: GeneratedModel) -> None:
    """Every scale site the analysis offers (norm gains, linear writers, gated products) takes the searched scales
    with the graph's function unchanged (float64, 1e-9), idempotent, ``modified`` honest."""
    stats = _statistics(generated.model, generated)
    after, modified = assert_float_exact_pass(
        lambda: ActivationAwareScalePass(bits=4, group_size=None, statistics=stats),
        generated.model,
        generated.inputs(2),
    )
    probe = ActivationAwareScalePass(bits=4, group_size=None, statistics=stats)
    probe(ir.serde.deserialize_model(generated.model))
    assert modified == any(c.alpha > 0 for c in probe.choices)
    assert all(c.error <= c.unscaled_error for c in probe.choices)
    if modified:
        assert after.metadata_props["qcompiler.awq_scales"].startswith("bits=4")


def test_scale_sites_find_norms_and_gated_products_and_name_what_blocks() -> None:
    """Pre-norm RMSNorm + SwiGLU: every norm output and every gated product is a site; the attention output
    (a Reshape of the heads writes it) and nothing else is blocked, with the node named."""
    from hypothesis import find

    generated = find(
        transformer_models(),
        lambda g: all(p in g.description for p in ("rms", "pre-norm", "swiglu", "layers=2")),
        settings=settings(database=None, max_examples=2000),
    )
    graph = ir.serde.deserialize_model(generated.model).graph
    sites = scale_sites(graph)
    kinds = sorted(site.kind or "blocked" for site in sites if not site.blockers)
    assert kinds == ["gated"] * 2 + ["norm"] * 5  # 2 per layer + the final norm
    blocked = [site for site in sites if site.blockers]
    assert len(blocked) == 2 and all("cannot absorb a per-channel scale" in s.blockers[0] for s in blocked)
    text = report(ir.serde.deserialize_model(generated.model)).format()
    assert "scale site:" in text and "scalable (gated)" in text


def test_awq_needs_statistics_and_says_how_to_get_them() -> None:
    from hypothesis import find

    generated = find(transformer_models(), lambda g: "pre-norm" in g.description, settings=settings(database=None))
    model = ir.serde.deserialize_model(generated.model)
    with pytest.raises(CalibrationError, match="awq-scales: needs calibration statistics.*hessians=True"):
        ActivationAwareScalePass()(model)
    with pytest.raises(PassFailedError, match="ActivationAwareScalePass.*calibration data.*calibrate="):
        Pipeline([ActivationAwareScalePass()], verify_each=False).run(model)
    with pytest.raises(ValueError, match="grid: must be >= 1"):
        ActivationAwareScalePass(grid=0)
    # with a calibrator, the pipeline calibrates the graph as it stands just before the pass
    seen = []

    def calibrate(graph: ir.Model):
        seen.append(len(graph.graph))
        return observe(graph, generated.inputs(2), progress=False, hessians=True)

    result = Pipeline([ActivationAwareScalePass(group_size=None)], verify_each=False, calibrate=calibrate).run(model)
    assert seen == [len(ir.serde.deserialize_model(generated.model).graph)] and len(result.records) == 1


# -- the output-error clipping search (AWQ's) --------------------------------------------------------------------


def test_output_clip_search_minimises_the_output_error() -> None:
    """Per group, the ratio the output objective picks gives an output error no larger than the weight objective's
    pick; with H = I the two objectives are the same search."""
    x = _salient_inputs(seed=4)
    w = np.random.default_rng(5).standard_normal((32, 48))
    h = hessian(x)
    grid = tuple(1.0 - k / 20 for k in range(1, 11))
    by_weight = WeightQuantSpec(4, group_size=8, clip_grid=grid)
    by_output = WeightQuantSpec(4, group_size=8, clip_grid=grid, clip_objective="output")

    def output_error(q) -> float:
        delta = q.dequantize() - w
        return float(((h @ delta) * delta).sum())

    chosen = quantize_rtn(w, by_output, h)
    assert output_error(chosen) <= output_error(quantize_rtn(w, by_weight)) + 1e-12
    assert output_error(chosen) <= output_error(quantize_rtn(w, WeightQuantSpec(4, group_size=8))) + 1e-12
    identity = quantize_rtn(w, by_output, np.eye(32))
    np.testing.assert_array_equal(identity.q, quantize_rtn(w, by_weight).q)
    # GPTQ takes the same objective for its group parameters
    assert gptq(w, h, by_output).q.shape == w.shape
    with pytest.raises(ValueError, match="clip_objective 'output' needs the input Hessian"):
        quantize_rtn(w, by_output)
    with pytest.raises(ValueError, match="clip_objective: must be 'weight' or 'output'"):
        WeightQuantSpec(4, clip_objective="activation")


# -- KLT-enhanced rotation (MambaQuant) -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [12, 32, 52])  # Paley, Sylvester, and no Hadamard (random orthogonal)
def test_klt_rotation_equalises_channel_variances_exactly(n: int) -> None:
    rng = np.random.default_rng(n)
    mixing = rng.standard_normal((n, n)) * np.geomspace(30.0, 0.1, n)[:, None]
    x = rng.standard_normal((2048, n)) @ mixing  # correlated channels of very different scales
    covariance = x.T @ x / len(x)
    q = klt_rotation(covariance, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    variances = ((x @ q) ** 2).mean(axis=0)
    if n != 52:  # |H_ij| = 1/sqrt(n): every channel gets exactly the mean eigenvalue
        np.testing.assert_allclose(variances, np.trace(covariance) / n, rtol=1e-9)
    plain = ((x @ klt_rotation(np.eye(n), seed=1)) ** 2).mean(axis=0)  # K = I: the randomised Hadamard alone
    assert variances.max() / variances.min() <= plain.max() / plain.min()
    with pytest.raises(ValueError, match="not symmetric"):
        klt_rotation(np.triu(covariance) + np.eye(n))


@PROPERTY
@given(transformer_models())
def test_klt_rotations_are_exact(generated: GeneratedModel) -> None:
    """The residual (R1) and per-head (R2) KLT rotations, from the covariance of this graph's calibration, are
    float-exact like any rotation; the residual one applies exactly where a Hadamard one does."""
    folded = ir.serde.deserialize_model(generated.model)
    FoldNormGainsPass()(folded)
    stats = _statistics(folded, generated)
    rotatable = "rms" in generated.description and "pre-norm" in generated.description
    after, modified = assert_float_exact_pass(
        lambda: RotateResidualPass("klt", statistics=stats), folded, generated.inputs(2)
    )
    assert modified == rotatable
    if modified:
        assert after.metadata_props["qcompiler.rotate_residual"] == "klt:0"
    _, modified = assert_float_exact_pass(lambda: RotateHeadsPass("klt", statistics=stats), folded, generated.inputs(2))
    assert modified


def test_klt_rotation_needs_statistics() -> None:
    from hypothesis import find

    generated = find(transformer_models(), lambda g: "pre-norm" in g.description, settings=settings(database=None))
    with pytest.raises(CalibrationError, match="rotation 'klt' needs calibration statistics"):
        RotateHeadsPass("klt")(ir.serde.deserialize_model(generated.model))
    assert RotateResidualPass("klt").needs_calibration and not RotateResidualPass().needs_calibration
    with pytest.raises(ValueError, match="'klt'"):
        RotateResidualPass("kltt")
