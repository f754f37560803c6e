"""Pass pipelines: verify-each, per-pass timing and change counts, IR dumps, probe comparisons.

A pipeline is a list of plain ``onnx_ir`` passes. It adds what a compiler developer needs when a
pass goes wrong: the verifier after every pass, a comparison of outputs with the previous stage on a
probe input, and the name of the pass that broke the graph.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import PassFailedError, QCompilerError, VerificationError
from qcompiler.ir.graph import naming, release_removed_values
from qcompiler.ir.verifier import verify
from qcompiler.logs import third_party_routed

logger = logging.getLogger(__name__)

Runner = Callable[[ir.Model, Mapping[str, np.ndarray]], list[np.ndarray]]
#: calibrates a model as it stands: :func:`qcompiler.calibrate.observe` with ``hessians=True`` on the data
Calibrator = Callable[[ir.Model], Any]


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, wall time, the ``modified`` flag and the node changes by op type."""

    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    added: Mapping[str, int]
    removed: Mapping[str, int]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    model: ir.Model
    records: tuple[PassRecord, ...]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


def _op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph
    )


def run_model(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run any model of the pipeline (float, QDQ, or integer dialect) on the reference interpreter."""
    from qcompiler.dialect import run_reference

    return [np.asarray(o) for o in run_reference(ir.serde.serialize_model(model), feeds)]


def run_onnxruntime(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a standard-ONNX model in onnxruntime (fast probe runner for float stages), in segments
    (:class:`~qcompiler.ir.ort_session.SegmentedSession`: a few hundred MB of weights in play at a time)."""
    from qcompiler.ir.ort_session import SegmentedSession, onnxruntime_session

    names = [o.name for o in model.graph.outputs]
    produced = {v.name for node in model.graph for v in node.outputs}
    if not all(name in produced for name in names):  # an input or a constant as an output: one session
        session = onnxruntime_session(model)
        return [np.asarray(o) for o in session.run(None, dict(feeds))]
    values = dict(SegmentedSession(model, names, optimize=True).run(dict(feeds)))
    return [np.asarray(values[name]) for name in names]


class Pipeline:
    """Run passes in order with optional verification, probe comparison and IR dumps.

    Args:
        passes: ``onnx_ir`` passes (anything callable as ``pass_(model) -> PassResult``).
        verify_each: run :func:`qcompiler.ir.verify` after every pass.
        probe_inputs: feeds for an output comparison with the previous stage after every pass whose
            class attribute ``preserves_outputs`` is true (default true).
        rtol, atol: tolerance of that comparison.
        dump_dir: write ``NN_passname.onnx`` after every pass.
        runner: how to execute a model for the comparison (default: the reference interpreter).
        calibrate: statistics of the graph as it stands, for passes that choose their transform from data
            (class attribute ``needs_calibration`` true: AWQ's scale search, the KLT rotation): the pipeline calls
            ``pass_.use_statistics(calibrate(model))`` just before such a pass runs, unless it already holds
            ``statistics``.
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        *,
        verify_each: bool = True,
        probe_inputs: Mapping[str, np.ndarray] | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-6,
        dump_dir: str | Path | None = None,
        runner: Runner = run_model,
        calibrate: Calibrator | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.probe_inputs = dict(probe_inputs) if probe_inputs is not None else None
        self.rtol = rtol
        self.atol = atol
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.runner = runner
        self.calibrate = calibrate

    def __call__(self, model: ir.Model) -> PipelineResult:
        return self.run(model)

    def run(self, model: ir.Model) -> PipelineResult:
        records: list[PassRecord] = []
        reference = self._probe(model, "the input model") if self.probe_inputs is not None else None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        for index, pass_ in enumerate(self.passes):
            name = type(pass_).__name__
            before = _op_counts(model)
            start = time.perf_counter()
            if getattr(pass_, "needs_calibration", False) and getattr(pass_, "statistics", None) is None:
                if self.calibrate is None:
                    raise PassFailedError(
                        name,
                        "chooses its transform from calibration data: run it through qcompiler.compile or "
                        "qcompiler.simulate (which calibrate), or give the pipeline calibrate=",
                    )
                pass_.use_statistics(self.calibrate(model))
            try:
                with third_party_routed(), naming(model.graph):  # names read once per pass, not per new name
                    result = pass_(model)
            except QCompilerError:
                raise  # already names the pass, node or argument at fault
            except Exception as exc:
                raise PassFailedError(name, f"{type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            model = result.model
            release_removed_values(model)  # else every initializer the pass replaced stays in memory
            after = _op_counts(model)
            record = PassRecord(
                name=name,
                seconds=seconds,
                modified=bool(result.modified),
                nodes_before=sum(before.values()),
                nodes_after=sum(after.values()),
                added=dict(after - before),
                removed=dict(before - after),
            )
            records.append(record)
            logger.info(
                "pass %s: %.3fs modified=%s nodes %d -> %d",
                name,
                seconds,
                record.modified,
                record.nodes_before,
                record.nodes_after,
            )
            if self.verify_each:
                try:
                    verify(model)
                except VerificationError as exc:
                    raise PassFailedError(name, str(exc)) from exc
            if reference is not None and result.modified and getattr(pass_, "preserves_outputs", True):
                outputs = self._probe(model, name)
                self._compare(name, reference, outputs)
                reference = outputs
            if self.dump_dir is not None:
                ir.save(model, self.dump_dir / f"{index:02d}_{name}.onnx")
        return PipelineResult(model, tuple(records))

    def _probe(self, model: ir.Model, stage: str) -> list[np.ndarray]:
        assert self.probe_inputs is not None
        try:
            return self.runner(model, self.probe_inputs)
        except Exception as exc:
            raise PassFailedError(stage, f"the model no longer runs on the probe input: {exc}") from exc

    def _compare(self, name: str, expected: list[np.ndarray], actual: list[np.ndarray]) -> None:
        if len(expected) != len(actual):
            raise PassFailedError(name, f"output count changed from {len(expected)} to {len(actual)}")
        for position, (want, got) in enumerate(zip(expected, actual, strict=True)):
            if want.shape != got.shape:
                raise PassFailedError(name, f"output {position} shape changed {want.shape} -> {got.shape}")
            want64, got64 = want.astype(np.float64), got.astype(np.float64)
            # relative to the output's scale, not to each element: a float32 rewrite of a wide stream (a residual
            # rotation through 30 layers) moves a logit near 0 by the same float noise as one of 20
            scale = float(np.max(np.abs(want64))) if want64.size else 0.0
            worst = float(np.max(np.abs(got64 - want64))) if want64.size else 0.0
            if not worst <= self.atol + self.rtol * scale:
                raise PassFailedError(
                    name,
                    f"output {position} changed by up to {worst:.3g} on the probe input "
                    f"(allowed: atol={self.atol} + rtol={self.rtol} x max|output| {scale:.3g})",
                )


def format_records(records: Sequence[PassRecord]) -> str:
    """A fixed-width table of pass records (for the CLI and reports)."""
    lines = [f"{'pass':<36} {'ms':>9} {'modified':>8} {'nodes':>13}  changes"]
    for r in records:
        changes = ", ".join([f"+{v} {k}" for k, v in r.added.items()] + [f"-{v} {k}" for k, v in r.removed.items()])
        lines.append(
            f"{r.name:<36} {r.seconds * 1e3:>9.1f} {r.modified!s:>8} {r.nodes_before:>5} -> {r.nodes_after:<5}  "
            f"{changes}"
        )
    return "\n".join(lines)
