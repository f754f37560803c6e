"""Activation-aware weight scaling (AWQ, Lin et al.; REFERENCES.md section 3): a float-exact scale migration
chosen on calibration data for the weight quantizer that follows.

For a linear group (a tensor x and the linears reading it) whose producer can absorb ``1 / s`` on x's channels
(:func:`qcompiler.ir.regions.scale_sites`: a norm's gain and shift, a linear writer's output columns, the linear
writing one factor of a gated product), ``x W = (x / s)(diag(s) W)`` exactly. The salient input channels (large
``mean |x_c|``) get ``s_c > 1``, so their weight rows are quantized at a finer relative step. AWQ searches
``s = mean|x|^a`` (normalised by ``sqrt(max s * min s)``) over ``a`` in ``{0, 1/grid, ..., 1}`` for the smallest
output error of the quantized group, ``sum_readers tr(dW^T H dW)`` with ``dW = Q(diag(s) W) / s - W`` and
``H = 2 X^T X / N`` the input Hessian from calibration: exactly ``2 ||X dW||^2 / N``, so no activations are
kept. ``a = 0`` (no scaling) always competes, so the search never makes the group worse on its calibration
data. The clipping half of AWQ belongs to the weight quantizer (``clip_objective = "output"``).

The pass needs calibration statistics (``needs_calibration``; :class:`qcompiler.pipeline.Pipeline` hands them
over through ``use_statistics`` before it runs the pass, from the graph as it is at that point). It records
what it did in the model's metadata and does nothing a second time (scales searched again on the scaled graph
would differ), so it is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompiler.calibrate import ActivationRanges
from qcompiler.errors import CalibrationError
from qcompiler.ir.graph import const_array, node_label
from qcompiler.ir.regions import ScaleSite, scale_sites
from qcompiler.passes.quantize.weights import WeightQuantSpec, quantize_rtn
from qcompiler.passes.transform.weights import as_in_out, scale_input, scale_output, set_input_constant

logger = logging.getLogger(__name__)

MARKER = "qcompiler.awq_scales"


def group_error(weights: list[np.ndarray], hessian: np.ndarray, scales: np.ndarray, spec: WeightQuantSpec) -> float:
    """``sum_W tr(dW^T H dW)``, ``dW = Q(diag(s) W) / s - W``: the group's squared output error (times ``2 / N``)
    on the calibration inputs when its weights are quantized after scaling their input rows by ``s``."""
    total = 0.0
    s = scales.reshape(-1, 1)
    for w in weights:
        delta = quantize_rtn(s * w, spec).dequantize() / s - w
        total += float(((hessian @ delta) * delta).sum())
    return total


def search_scales(
    weights: list[np.ndarray], hessian: np.ndarray, mean_abs: np.ndarray, spec: WeightQuantSpec, grid: int = 20
) -> tuple[np.ndarray, float, dict[float, float]]:
    """AWQ's grid search: ``s = mean|x|^a / sqrt(max * min)`` for ``a = k / grid``; returns the best scales, its
    ``a`` and every ``a``'s error (:func:`group_error`)."""
    base = np.maximum(np.asarray(mean_abs, np.float64), 1e-4 * max(float(np.max(mean_abs)), 1e-30))
    errors: dict[float, float] = {}
    best = (np.ones_like(base), 0.0)
    for k in range(grid + 1):
        alpha = k / grid
        s = base**alpha
        s = s / np.sqrt(s.max() * s.min())
        errors[alpha] = group_error(weights, hessian, s, spec)
        if errors[alpha] < errors[best[1]]:
            best = (s, alpha)
    return best[0], best[1], errors


@dataclasses.dataclass(frozen=True)
class ScaleChoice:
    """What the search chose for one group: its tensor, ``a``, and the error with and without the scales."""

    value: str
    alpha: float
    error: float
    unscaled_error: float


class ActivationAwareScalePass(ir.passes.InPlacePass):
    """AWQ's scale search and migration on every scale site of the graph.

    Args:
        bits, group_size, symmetric: the weight quantizer the scales are searched for (RTN; 4 bits in groups of
            128 by default, AWQ's setting).
        grid: ``a`` takes ``grid + 1`` values in [0, 1].
        statistics: calibration of this graph (``observe(..., hessians=True)``); else the pipeline gives it.
    """

    needs_calibration = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = True,
        grid: int = 20,
        statistics: ActivationRanges | None = None,
    ) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid: must be >= 1, got {grid}")
        self.spec = WeightQuantSpec(bits, group_size=group_size or None, symmetric=symmetric)
        self.grid = grid
        self.statistics = statistics
        self.choices: list[ScaleChoice] = []
        self.skipped: dict[str, list[str]] = {}

    def use_statistics(self, statistics: ActivationRanges) -> None:
        self.statistics = statistics

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.choices, self.skipped = [], {}
        if MARKER in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        if self.statistics is None:
            raise CalibrationError(
                "awq-scales: needs calibration statistics; run it through qcompiler.compile or qcompiler.simulate "
                "(which calibrate before it), or give statistics=observe(model, data, hessians=True)"
            )
        graph = model.graph
        plan = []
        for site in scale_sites(graph):
            name = site.value.name or "?"
            if site.blockers:
                self.skipped[name] = site.blockers
                continue
            h = self.statistics.hessians.get(name)
            mean_abs = self.statistics.channel_meanabs.get(name)
            if h is None or mean_abs is None or h.shape[0] != site.readers[0].in_features:
                self.skipped[name] = [f"no calibration statistics for {name!r}: calibrate this same graph"]
                continue
            weights = [as_in_out(r) for r in site.readers]
            scales, alpha, errors = search_scales(weights, h, mean_abs, self.spec, self.grid)
            self.choices.append(ScaleChoice(name, alpha, errors[alpha], errors[0.0]))
            if alpha > 0.0:
                plan.append((site, scales))
        for site, scales in plan:
            _migrate(graph, site, scales)
        for name, reasons in self.skipped.items():
            logger.info("awq-scales: %s skipped: %s", name, "; ".join(reasons[:2]))
        if plan:
            model.metadata_props[MARKER] = f"bits={self.spec.bits}:group={self.spec.group_size}:grid={self.grid}"
        return ir.passes.PassResult(model, modified=bool(plan))


def _migrate(graph: ir.Graph, site: ScaleSite, scales: np.ndarray) -> None:
    """x -> x / s at the producer, W -> diag(s) W in every reader."""
    inverse = 1.0 / scales
    if site.kind == "norm":
        assert site.norm is not None
        for index in (1, 2):
            if len(site.norm.inputs) > index and site.norm.inputs[index] is not None:
                array = const_array(site.norm.inputs[index])
                assert array is not None
                scaled = (array.astype(np.float64).reshape(-1) * inverse).reshape(array.shape)
                set_input_constant(graph, site.norm, index, scaled.astype(array.dtype))
    else:
        assert site.writer is not None
        scale_output(graph, site.writer, inverse)
    for reader in site.readers:
        scale_input(graph, reader, scales)
    logger.debug("awq-scales: %s scaled (%s)", site.value.name, node_label(site.norm) if site.norm else site.kind)
