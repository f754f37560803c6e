"""Mixed precision as HAWQ-V3 poses it: each linear layer's weight bits (4 or 8) chosen by an integer linear
program that minimises the summed sensitivity under a size budget (scipy.optimize.milp).

Sensitivity of a layer at ``b`` bits: its output error on the calibration inputs when its weight is rounded to
``b`` bits, ``tr(dW^T H dW)`` with ``dW = W - Q_b(W)`` (``[in, out]``) and ``H = 2 X^T X / N`` its input's Hessian
(what calibration collects for GPTQ): exactly ``2 E ||x dW||^2``, the measured output error, not a Hessian-trace
estimate. ``Q_b`` is round-to-nearest as the recipe would quantize without GPTQ: per output channel at 8 bits,
per group of ``group_size`` inputs with the recipe's integer group scales at 4. The choice feeds
``QuantizeConfig.layer_weight_bits`` (the mechanism); this module is the policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import const_array
from qcompiler.passes.quantize.precision import hadamard_matmul
from qcompiler.passes.quantize.qdq import QuantizeConfig, int4_weight_spec, layer_names, quantize_weight_per_channel
from qcompiler.passes.quantize.weights import quantize_rtn

BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One linear layer's output error and weight bytes at each width."""

    name: str  # the first of its layer_names: what a layer_weight_bits pattern can match exactly
    errors: Mapping[int, float]  # bits -> tr(dW^T H dW) on the calibration inputs
    sizes: Mapping[int, int]  # bits -> bytes of its codes and scales


def _in_out(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[in, out]`` (a MatMul's already; a Gemm's with transB transposed)."""
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return (weight.T if transposed else weight).astype(np.float64)


def _rounded(w: np.ndarray, bits: int, config: QuantizeConfig) -> tuple[np.ndarray, int]:
    """``Q_bits(w)`` for ``w [in, out]`` and its bytes (codes and scales)."""
    k, n = w.shape
    if bits == 8:
        q, scales = quantize_weight_per_channel(w, axis=1)
        return q.astype(np.float64) * scales.astype(np.float64)[None, :], k * n + 4 * n
    spec = int4_weight_spec(config, k)
    result = quantize_rtn(w, spec)
    groups = result.scales.shape[0]
    rows = np.arange(k) // (spec.group_size or k)
    return result.q.astype(np.float64) * result.scales.astype(np.float64)[rows], (k * n + 1) // 2 + 2 * n * groups


def layer_costs(graph: ir.Graph, hessians: Mapping[str, np.ndarray], config: QuantizeConfig) -> list[LayerCost]:
    """The cost of every linear layer (a MatMul or Gemm with a constant weight whose input Hessian calibration
    collected; online Hadamards keep their +-1 codes and are left out) at 4 and 8 bits."""
    costs = []
    for node in graph:
        weight = const_array(node.inputs[1]) if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        source = node.inputs[0]
        if weight is None or weight.ndim != 2 or source is None or source.name not in hessians:
            continue
        if hadamard_matmul(node) is not None:
            continue
        w, h = _in_out(node, weight), hessians[source.name].astype(np.float64)
        errors, sizes = {}, {}
        for bits in BITS:
            rounded, sizes[bits] = _rounded(w, bits, config)
            dw = w - rounded
            errors[bits] = float(np.einsum("io,ij,jo->", dw, h, dw))
        names = layer_names(node)
        costs.append(LayerCost(names[0] if names else node.name or "", errors, sizes))
    return costs


def choose_layer_bits(costs: Sequence[LayerCost], budget: int) -> dict[str, int]:
    """Each layer's bits minimising the summed error with the summed size at most ``budget`` bytes (an exact
    0-1 program: one binary per layer and width, one width per layer).

    Raises:
        ValueError: the budget is below every layer at 4 bits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    least = sum(c.sizes[min(BITS)] for c in costs)
    if budget < least:
        raise ValueError(f"budget: {budget} bytes is below every layer at {min(BITS)} bits ({least} bytes)")
    layers, widths = len(costs), len(BITS)
    objective = np.array([c.errors[b] for c in costs for b in BITS])
    sizes = np.array([c.sizes[b] for c in costs for b in BITS], np.float64)
    one_width = np.kron(np.eye(layers), np.ones(widths))
    constraints = [LinearConstraint(one_width, 1, 1), LinearConstraint(sizes[None, :], 0, budget)]
    result = milp(objective / max(objective.max(), 1e-30), constraints=constraints, integrality=np.ones(objective.size),
                  bounds=Bounds(0, 1))  # fmt: skip
    if not result.success:
        raise ValueError(f"budget: the program found no choice within {budget} bytes ({result.message})")
    chosen = np.asarray(result.x).reshape(layers, widths).argmax(axis=1)
    return {c.name: BITS[i] for c, i in zip(costs, chosen, strict=True)}


def as_layer_weight_bits(choice: Mapping[str, int], default: int) -> dict[str, int]:
    """The ``layer_weight_bits`` table of a choice: one exact pattern per layer whose bits differ from
    ``default`` (fnmatch's special characters escaped)."""
    return {_escaped(name): bits for name, bits in choice.items() if bits != default}


def _escaped(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
