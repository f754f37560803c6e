"""Op-by-op agreement of an integer-only graph with its simulation (the QDQ graph it was lowered from).

End to end, a deep model's integer code and its float simulation drift apart: each rare rounding flip (float
accumulation and rescaling against the dyadic ``x * b >> c``) is carried into every later layer. Compared op by
op, with each integer op fed the simulation's own values for its inputs (teacher forcing), every lowering can
be checked on its own, at any depth: this is what "the integer code matches its simulation within one
quantization step per element" means for a 30-layer model, and it names the op that does not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from qcompiler.dialect import DOMAIN
from qcompiler.dialect.reference import REFERENCE_OPS
from qcompiler.ir.ort_session import onnxruntime_session

_INTEGER = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16})


@dataclass(frozen=True)
class OpAgreement:
    """One integer op's output against the simulation's value of the same name, in integer steps."""

    node: str
    op_type: str
    value: str
    size: int
    within: float  # fraction of elements within the allowed number of steps
    max_steps: int
    mean_steps: float


def _as_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model  # only read


def shared_values(simulation: ir.Model, integer: ir.Model) -> list[str]:
    """Integer values both graphs compute under one name: the simulation's QuantizeLinear (or integer
    nonlinearity) outputs that the lowering kept (:func:`qcompiler.passes.lower.groups.replace_group_output`
    gives the integer op the name of the Q output it replaces), in the integer graph's order."""
    simulated = {
        out.name
        for node in simulation.graph
        if node.op_type == "QuantizeLinear" or node.domain == DOMAIN
        for out in node.outputs
        if out.dtype in _INTEGER
    }
    return [
        out.name
        for node in integer.graph
        for out in node.outputs
        if out.name in simulated and out.dtype in _INTEGER and node.op_type != "QuantizeLinear"
    ]


def _simulation_runner(simulation: ir.Model, names: Sequence[str]) -> Callable[[Mapping[str, np.ndarray]], dict]:
    """``feeds -> {name: value}`` for ``names`` (and the outputs): the reference interpreter when the simulation
    holds ``qcompiler`` ops (integer nonlinearities), else onnxruntime with QDQ fusion off (so in float)."""
    if any(node.domain == DOMAIN for node in simulation.graph):
        proto = ir.serde.serialize_model(simulation)
        existing = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
        evaluator = ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
        wanted = [o.name for o in proto.graph.output]
        return lambda feeds: dict(zip(wanted, evaluator.run(None, dict(feeds)), strict=True))
    session = onnxruntime_session(simulation, names, optimize=False)
    outputs = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(outputs, session.run(None, dict(feeds)), strict=True))


class _Comparison:
    """Both graphs prepared once (the simulation's runner, the integer graph's interpreter) for any number of
    inputs."""

    def __init__(self, simulation: onnx.ModelProto | ir.Model, integer: onnx.ModelProto | ir.Model) -> None:
        simulation_ir, integer_ir = _as_ir(simulation), _as_ir(integer)
        names = shared_values(simulation_ir, integer_ir)
        if not names:
            raise ValueError(
                "compare_lowering: the graphs share no quantized value; pass the QDQ graph the integer graph was "
                "lowered from (qcompiler.api.quantize_to_integer returns both)"
            )
        self.simulate = _simulation_runner(simulation_ir, names)
        proto = integer if isinstance(integer, onnx.ModelProto) else ir.serde.serialize_model(integer)
        self.evaluator = ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
        self.producers = {out.name: node for node in integer_ir.graph for out in node.outputs}
        self.wanted = set(names)

    def rows(self, feeds: Mapping[str, np.ndarray], steps: int) -> list[OpAgreement]:
        teacher = self.simulate(feeds)
        results: dict[str, Any] = {"": None, **self.evaluator.rt_inits_, **feeds}
        rows = []
        for op in self.evaluator.rt_nodes_:
            inputs = [teacher[name] if name in teacher else results[name] for name in op.input]
            for name, value in zip(op.output, op.run(*inputs), strict=False):
                results[name] = value
                if name not in self.wanted:
                    continue
                gap = np.abs(np.asarray(value, np.int64) - np.asarray(teacher[name], np.int64))
                node = self.producers[name]
                rows.append(
                    OpAgreement(
                        node=node.name or name,
                        op_type=node.op_type,
                        value=name,
                        size=int(gap.size),
                        within=float(np.mean(gap <= steps)) if gap.size else 1.0,
                        max_steps=int(gap.max(initial=0)),
                        mean_steps=float(gap.mean()) if gap.size else 0.0,
                    )
                )
        return rows


def compare_lowering(
    simulation: onnx.ModelProto | ir.Model,
    integer: onnx.ModelProto | ir.Model,
    feeds: Mapping[str, np.ndarray],
    steps: int = 1,
) -> list[OpAgreement]:
    """Run ``simulation`` (onnxruntime; the reference interpreter when it holds ``qcompiler`` ops), then each op
    of ``integer`` on the reference interpreter with every input the simulation also computes taken from the
    simulation; one :class:`OpAgreement` per integer op output the simulation has a value for. Neither graph is
    modified.

    Raises:
        ValueError: the graphs share no integer value (``integer`` was not lowered from ``simulation``).
    """
    return _Comparison(simulation, integer).rows(feeds, steps)


def assert_lowering_matches(
    simulation: onnx.ModelProto | ir.Model,
    integer: onnx.ModelProto | ir.Model,
    inputs: Sequence[Mapping[str, np.ndarray]],
    steps: int = 1,
) -> list[OpAgreement]:
    """Assert every op of ``integer``, fed the simulation's inputs, is within ``steps`` integer steps of the
    simulation for every element (:func:`compare_lowering`); the message names each op that is not.
    Returns the rows of the last input."""
    comparison = _Comparison(simulation, integer)
    rows: list[OpAgreement] = []
    for feeds in inputs:
        rows = comparison.rows(feeds, steps)
        bad = [r for r in rows if r.max_steps > steps]
        if bad:
            listed = "; ".join(
                f"{r.node} ({r.op_type}) -> {r.value}: {1 - r.within:.2%} of {r.size} beyond, max {r.max_steps}"
                for r in bad[:5]
            )
            raise AssertionError(f"{len(bad)} integer ops are more than {steps} step(s) from the simulation: {listed}")
    return rows
