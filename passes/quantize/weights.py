"""Weight quantizers: round-to-nearest (with an optional clipping search) and GPTQ, per output channel or per
group of input rows, 2 to 8 bits, symmetric or asymmetric; INT4 packing two per byte.

Conventions: a weight is ``W [in, out]`` (``y = x W``, the :class:`~qcompiler.ir.regions.Linear` layout). A
group is ``group_size`` consecutive input rows sharing one scale (and zero point) per output column; per channel
is one group spanning every row. Codes are integers: symmetric ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` with zero
point 0 (the -2^(b-1) code is left unused, so negating a code never overflows and the AVX2 ``psign`` path stays
exact); asymmetric ``q in [0, 2^b - 1]`` with an integer zero point. ``W ~ (q - z) s``.

GPTQ (Frantar et al., REFERENCES.md section 5) quantizes the rows of W in order (largest Hessian diagonal
first with ``act_order``) and, after each, spreads its rounding error over the rows not yet quantized through
the inverse Hessian ``H = 2 X^T X`` (damped by a fraction of its mean diagonal), which minimises the layer's
output error ``||X W - X Q||`` one row at a time. With ``H = I`` nothing spreads and GPTQ is exactly RTN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.dialect.int4 import pack_int4, unpack_int4
from qcompiler.passes.quantize.formats import shared_exponent_scale

__all__ = [
    "QuantizedWeight", "WeightQuantSpec", "gptq", "hessian", "pack_int4", "quantize_rtn", "snap_scales", "unpack_int4",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WeightQuantSpec:
    """How to quantize a weight. Validated on construction."""

    bits: int = 8
    #: rows per group along the input axis; None: one scale per output channel
    group_size: int | None = None
    symmetric: bool = True
    #: search a per-column (per-group) clipping ratio on this grid, minimising the weight's squared error
    clip_grid: tuple[float, ...] = ()
    #: what the clipping search minimises: ``weight`` (``||dW||^2``) or ``output`` (AWQ's clipping search: the
    #: group's output error ``dw^T H_gg dw`` on the calibration inputs, through the input Hessian's diagonal
    #: block; the quantizers then need the Hessian)
    clip_objective: str = "weight"
    #: snap every group scale up to a multiple of ``s_max / 2^scale_grid_bits``, ``s_max`` the column's largest
    #: group scale: the integer kernels then rescale groups by exact integers ``b in [1, 2^bits]``
    #: (:func:`qcompiler.dialect.group_scale_bits`); symmetric only
    scale_grid_bits: int | None = None
    #: MX's shared exponent: each group's scale the power of two ``2^(floor(log2 max|w|) - (bits - 2))`` (the
    #: element ``q 2^-(bits-2)`` under OCP's ``X = 2^(floor(log2 max|w|))``), codes saturating at ``qmax``
    #: (:data:`qcompiler.passes.quantize.formats.FORMATS` ``mxint4``, ``mxint8``); symmetric, no clipping search
    shared_exponent: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits: must lie in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size: must be >= 1 or None (per channel), got {self.group_size}")
        if any(not 0.0 < r <= 1.0 for r in self.clip_grid):
            raise ValueError(f"clip_grid: ratios must lie in (0, 1], got {list(self.clip_grid)}")
        if self.clip_objective not in ("weight", "output"):
            raise ValueError(f"clip_objective: must be 'weight' or 'output', got {self.clip_objective!r}")
        if self.scale_grid_bits is not None and not (0 <= self.scale_grid_bits <= 14 and self.symmetric):
            raise ValueError(
                f"scale_grid_bits: must lie in [0, 14] with symmetric quantization, got {self.scale_grid_bits}"
            )
        if self.shared_exponent and (not self.symmetric or self.clip_grid or self.bits < 3):
            raise ValueError("shared_exponent: symmetric codes of 3 bits or more, without clip_grid (the scale is "
                             "the block's power of two)")  # fmt: skip

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes ``q [in, out]`` (int8 storage), ``scales`` and ``zeros`` of shape ``[groups, out]``."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    group_size: int

    def dequantize(self) -> np.ndarray:
        rows = np.arange(self.q.shape[0]) // self.group_size
        return (self.q.astype(np.float64) - self.zeros[rows]) * self.scales[rows]


def _group_size(spec: WeightQuantSpec, rows: int) -> int:
    return rows if spec.group_size is None else min(spec.group_size, rows)


def _params(block: np.ndarray, spec: WeightQuantSpec, ratio: float | np.ndarray = 1.0) -> tuple[np.ndarray, ...]:
    """Scale and zero point per column of ``block [rows, out]`` from its (clipped) range."""
    if spec.shared_exponent:  # X = 2^(floor(log2 max|w|)) (emax 0), codes at 2^-(bits-2) of it
        scale = shared_exponent_scale(np.abs(block).max(axis=0), 0) * 2.0 ** -(spec.bits - 2)
        return scale, np.zeros(block.shape[1])
    if spec.symmetric:
        absmax = np.abs(block).max(axis=0) * ratio
        scale = np.where(absmax > 0, absmax / spec.qmax, 1.0)
        return scale, np.zeros_like(scale)
    lo = np.minimum(block.min(axis=0), 0.0) * ratio
    hi = np.maximum(block.max(axis=0), 0.0) * ratio
    scale = np.where(hi > lo, (hi - lo) / spec.qmax, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, spec.qmax)
    return scale, zero


def _codes(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: WeightQuantSpec) -> np.ndarray:
    return np.clip(np.round(values / scale) + zero, spec.qmin, spec.qmax)


def _group_params(
    block: np.ndarray, spec: WeightQuantSpec, h_block: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero per column, with the clipping ratio from ``spec.clip_grid`` that minimises, column by
    column, the block's squared rounding error, or with ``h_block`` (the input Hessian's block of these rows)
    its output error ``dw^T H dw`` (ratio 1 always competes)."""
    best_scale, best_zero = _params(block, spec)
    if not spec.clip_grid:
        return best_scale, best_zero

    def error(scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        delta = (_codes(block, scale, zero, spec) - zero) * scale - block
        return (delta**2).sum(axis=0) if h_block is None else ((h_block @ delta) * delta).sum(axis=0)

    best_err = error(best_scale, best_zero)
    for ratio in spec.clip_grid:
        scale, zero = _params(block, spec, ratio)
        err = error(scale, zero)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_err = np.minimum(err, best_err)
    return best_scale, best_zero


def snap_scales(scales: np.ndarray, bits: int) -> np.ndarray:
    """Group scales ``[groups, out]`` rounded up to ``s_max * b / 2^bits`` with integer ``b in [1, 2^bits]``,
    ``s_max`` each column's largest (rounding up never clips a code)."""
    top = scales.max(axis=0, keepdims=True)
    steps = np.clip(np.ceil(scales / top * 2.0**bits - 1e-9), 1, 2**bits)
    return top * steps / 2.0**bits


def _output_hessian(spec: WeightQuantSpec, hessian: np.ndarray | None, rows: int) -> np.ndarray | None:
    """The Hessian the clipping search weighs errors with (``clip_objective = "output"``), checked; else None."""
    if spec.clip_objective != "output" or not spec.clip_grid:
        return None
    if hessian is None:
        raise ValueError("clip_objective 'output' needs the input Hessian (calibrate with hessians=True)")
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (rows, rows):
        raise ValueError(f"hessian: expected shape {(rows, rows)} for a weight with {rows} input rows, got {h.shape}")
    return h


def _all_group_params(
    w: np.ndarray, spec: WeightQuantSpec, size: int, hessian: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    groups = -(-w.shape[0] // size)
    scales, zeros = np.empty((groups, w.shape[1])), np.empty((groups, w.shape[1]))
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        scales[g], zeros[g] = _group_params(w[rows], spec, None if hessian is None else hessian[rows, rows])
    if spec.scale_grid_bits is not None:
        scales = snap_scales(scales, spec.scale_grid_bits)
    return scales, zeros


def quantize_rtn(weight: np.ndarray, spec: WeightQuantSpec, hessian: np.ndarray | None = None) -> QuantizedWeight:
    """Round to nearest, per group (with the clipping search if ``spec.clip_grid``).

    Args:
        weight: ``[in, out]`` float.
        hessian: ``[in, in]`` input Hessian, required by ``spec.clip_objective == "output"``.

    Raises:
        ValueError: a weight that is not a finite matrix, or a missing or misshapen Hessian the search needs.
    """
    w = _as_matrix(weight)
    size = _group_size(spec, w.shape[0])
    scales, zeros = _all_group_params(w, spec, size, _output_hessian(spec, hessian, w.shape[0]))
    rows = np.arange(w.shape[0]) // size
    q = _codes(w, scales[rows], zeros[rows], spec)
    return QuantizedWeight(q.astype(np.int8), scales, zeros, size)


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    spec: WeightQuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    static_groups: bool = False,
) -> QuantizedWeight:
    """GPTQ with lazy batched updates (``block`` rows at a time).

    Args:
        weight: ``[in, out]`` float.
        hessian: ``[in, in]``, ``2 X^T X`` over calibration inputs (any positive multiple works).
        spec: bits, groups, symmetry, clipping grid (the group's parameters are chosen when GPTQ reaches the
            group's first row, from the weights updated so far).
        damp: fraction of the mean diagonal added to the diagonal.
        act_order: quantize rows in order of decreasing Hessian diagonal (groups still follow the original
            row order, so the stored layout stays plain).
        block: rows per lazy batch.
        static_groups: every group's parameters from the original weights, before any update (forced by
            ``spec.scale_grid_bits``, which snaps all of a column's group scales together).

    Raises:
        ValueError: shapes that do not match, or a Hessian that is not finite.
    """
    w = _as_matrix(weight).copy()
    rows, cols = w.shape
    h = np.asarray(hessian, dtype=np.float64).copy()
    if h.shape != (rows, rows):
        raise ValueError(f"hessian: expected shape {(rows, rows)} for a weight with {rows} input rows, got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian: contains NaN or infinity")
    clip_h = _output_hessian(spec, h.copy(), rows)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # rows no calibration input ever excites: quantized plainly
    h[np.diag_indices(rows)] += damp * float(np.mean(np.diag(h)))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
    w, h = w[order], h[np.ix_(order, order)]
    # upper Cholesky factor of H^-1: row i holds the update coefficients for the rows after i
    inverse = np.linalg.cholesky(np.linalg.inv(h)).T
    size = _group_size(spec, rows)
    groups = -(-rows // size)
    scales, zeros = np.ones((groups, cols)), np.zeros((groups, cols))
    fixed = np.zeros(groups, dtype=bool)
    if static_groups or spec.scale_grid_bits is not None:
        restored_w = np.empty_like(w)
        restored_w[order] = w
        scales, zeros = _all_group_params(restored_w, spec, size, clip_h)
        fixed[:] = True
    q = np.empty(w.shape)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        errors = np.zeros((stop - start, cols))
        for i in range(start, stop):
            g = order[i] // size
            if not fixed[g]:  # the group's parameters, from its rows as updated so far
                members = np.nonzero(order // size == g)[0]
                block_h = None if clip_h is None else clip_h[np.ix_(order[members], order[members])]
                scales[g], zeros[g] = _group_params(w[members], spec, block_h)
                fixed[g] = True
            q[i] = _codes(w[i], scales[g], zeros[g], spec)
            error = (w[i] - (q[i] - zeros[g]) * scales[g]) / inverse[i, i]
            w[i + 1 : stop] -= np.outer(inverse[i, i + 1 : stop], error)
            errors[i - start] = error
        w[stop:] -= inverse[start:stop, stop:].T @ errors
    restored = np.empty_like(q)
    restored[order] = q
    return QuantizedWeight(restored.astype(np.int8), scales, zeros, size)


def hessian(inputs: np.ndarray) -> np.ndarray:
    """``2 X^T X / N`` over the rows of ``inputs [..., in]`` (float64)."""
    x = np.asarray(inputs, dtype=np.float64).reshape(-1, np.shape(inputs)[-1])
    return 2.0 * (x.T @ x) / max(len(x), 1)


def _as_matrix(weight: np.ndarray) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight: expected a 2-D [in, out] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight: contains NaN or infinity")
    return w
