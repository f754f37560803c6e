"""Rotation fusion (QuaRot, SpinQuant): orthogonal changes of basis folded into the weights, exact in float.

- ``RotateResidualPass`` (R1): one orthogonal Q of size hidden on every residual stream the region analysis
  finds rotatable: embedding tables ``E <- E Q``, writers ``W <- W Q`` (and biases), readers ``W <- Q^T W``.
  Needs weightless RMSNorms on the stream (``fold-norm-gains`` first): ``RMSN(x Q) = RMSN(x) Q``.
- ``RotateHeadsPass`` (R2): a rotation R of size head_dim on every attention value path, on the output side of
  the V projection (every head, grouped-query heads included) and the input side of the output projection:
  the attention product mixes tokens, not channels, so ``P (V R) = (P V) R``.

The rotation is a randomised Hadamard matrix (``diag(s) H / sqrt(n)``, passes/transform/hadamard.py) where one
of that order can be built and a random orthogonal matrix elsewhere (the default, ``"hadamard-or-random"``);
``"hadamard"`` refuses sizes without one (before any weight changes), ``"random"`` always draws a random one,
``"klt"`` is MambaQuant's KLT-enhanced rotation ``K H`` from the calibration covariance of what the rotated
linears read (the pass then ``needs_calibration``: passes/transform/hadamard.py ``klt_rotation``).
Regions the analysis blocks are skipped, with the reason logged and kept in ``skipped``. A pass records what it
did in the model's metadata and does nothing the second time (rotating twice would compose a second, different
rotation), so both are idempotent.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompiler.calibrate import ActivationRanges
from qcompiler.dialect.hadamard import hadamard_structure
from qcompiler.errors import CalibrationError
from qcompiler.ir.graph import add_initializer, node_label
from qcompiler.ir.regions import hadamard_sites, head_pairs, residual_streams, score_sites
from qcompiler.passes.transform.hadamard import NoHadamardError, klt_rotation, online_hadamard
from qcompiler.passes.transform.hadamard import rotation as make_rotation
from qcompiler.passes.transform.weights import blockwise, rotate_input, rotate_output, set_input_constant

logger = logging.getLogger(__name__)


class _RotationPass(ir.passes.InPlacePass):
    marker = ""

    def __init__(
        self, rotation: str = "hadamard-or-random", seed: int = 0, statistics: ActivationRanges | None = None
    ) -> None:
        super().__init__()
        if rotation != "klt":
            make_rotation(4, rotation, seed)  # fail on a bad kind when the recipe is read, not mid-pipeline
        self.rotation = rotation
        self.seed = seed
        self.statistics = statistics
        self.skipped: dict[str, list[str]] = {}

    @property
    def needs_calibration(self) -> bool:
        """The KLT rotation comes from the calibration covariance of what the rotated linears read."""
        return self.rotation == "klt"

    def use_statistics(self, statistics: ActivationRanges) -> None:
        self.statistics = statistics

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.skipped = {}
        if self.marker in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        if self.rotation == "klt" and self.statistics is None:
            raise CalibrationError(
                f"{type(self).__name__}: rotation 'klt' needs calibration statistics; run it through "
                "qcompiler.compile or qcompiler.simulate, or give statistics=observe(model, data, hessians=True)"
            )
        modified = self.rotate(model.graph)
        if modified:
            model.metadata_props[self.marker] = f"{self.rotation}:{self.seed}"
        return ir.passes.PassResult(model, modified=modified)

    def rotate(self, graph: ir.Graph) -> bool:
        raise NotImplementedError

    def _covariance(self, names: list[str], where: str) -> np.ndarray | None:
        """The sum of the calibration second moments ``2 X^T X / N`` of ``names`` (None, with the reason kept
        under ``where``, when one is missing)."""
        assert self.statistics is not None
        missing = [n for n in names if n not in self.statistics.hessians]
        if missing or not names:
            self.skipped[where] = [f"no calibration covariance for {missing[:2] or names}: calibrate this graph"]
            return None
        return sum((self.statistics.hessians[n] for n in names), np.zeros((1, 1)))


class RotateResidualPass(_RotationPass):
    marker = "qcompiler.rotate_residual"

    def rotate(self, graph: ir.Graph) -> bool:
        plan = []  # every rotation first: a size without a Hadamard matrix fails before any weight changes
        for index, stream in enumerate(residual_streams(graph)):
            if stream.blockers:
                self.skipped[f"residual stream #{index}"] = stream.blockers
                logger.info("rotate-residual: stream #%d skipped: %s", index, "; ".join(stream.blockers[:3]))
                continue
            if self.rotation == "klt":  # what the readers see: the weightless norms' outputs, the stream itself
                names = sorted({r.node.inputs[0].name or "" for r in stream.all_readers})
                covariance = self._covariance(names, f"residual stream #{index}")
                if covariance is None:
                    continue
                plan.append((stream, klt_rotation(covariance, self.seed + index)))
            else:
                plan.append((stream, make_rotation(stream.hidden, self.rotation, self.seed + index)))
        for stream, q in plan:
            for gather in stream.embeddings:
                table = gather.inputs[0].const_value.numpy()
                set_input_constant(graph, gather, 0, (table.astype(np.float64) @ q).astype(table.dtype))
            for writer in stream.writers:
                rotate_output(graph, writer, q)
            for reader in stream.all_readers:
                rotate_input(graph, reader, q)
        return bool(plan)


class RotateHeadsPass(_RotationPass):
    marker = "qcompiler.rotate_heads"

    def rotate(self, graph: ir.Graph) -> bool:
        plan = []
        for pair in head_pairs(graph):
            if pair.blockers or pair.o is None or pair.head_dim is None:
                self.skipped[node_label(pair.v.node)] = pair.blockers
                logger.info("rotate-heads: %s skipped: %s", pair.v.label, "; ".join(pair.blockers))
                continue
            if self.rotation == "klt":  # the output projection's input, averaged over its heads
                name = pair.o.node.inputs[0].name or ""
                covariance = self._covariance([name], node_label(pair.v.node))
                if covariance is None:
                    continue
                d = pair.head_dim
                heads = covariance.shape[0] // d
                blocks = sum(covariance[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(heads))
                plan.append((pair, klt_rotation(blocks / heads, self.seed)))
            else:
                plan.append((pair, make_rotation(pair.head_dim, self.rotation, self.seed)))
        for pair, r in plan:
            assert pair.o is not None and pair.head_dim is not None
            rotate_output(graph, pair.v, blockwise(r, pair.v.out_features // pair.head_dim))
            rotate_input(graph, pair.o, blockwise(r, pair.o.in_features // pair.head_dim))
        return bool(plan)


class OnlineHadamardPass(ir.passes.InPlacePass):
    """Online Hadamard rotations (QuaRot): ``x -> x H`` at run time, ``W -> H^T W`` offline, where no offline
    rotation reaches: the input of every down projection (after the nonlinearity or the gated product) and,
    with ``"attention"``, the merged heads before every output projection; with ``"qk"``, Q and K after RoPE
    (SpinQuant's R3: ``Q H`` and ``K H`` before the score product, which stays ``Q K^T``).

    ``H = S_{2^m} (x) H_K / sqrt(n)`` is inserted as a float ``MatMul`` by that constant: exact in float and
    runnable by any ONNX runtime (calibration included); the quantizer recognises the structure, quantizes the
    MatMul's input at 16 bits and the lowering turns it into the integer ``Hadamard`` op (``n (K + m)`` adds).
    Sites whose width has no such matrix are skipped, with the reason kept in ``skipped``.

    Args:
        targets: which sites: ``"mlp"``, ``"attention"`` and/or ``"qk"``.
    """

    marker = "qcompiler.online_hadamard"

    def __init__(self, targets: tuple[str, ...] | list[str] = ("mlp",)) -> None:
        super().__init__()
        unknown = sorted(set(targets) - {"mlp", "attention", "qk"})
        if unknown or not targets:
            raise ValueError(f"targets: expected 'mlp', 'attention' and/or 'qk', got {list(targets)}")
        self.targets = tuple(targets)
        self.skipped: dict[str, list[str]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.skipped = {}
        if self.marker in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        plan = []
        for site in hadamard_sites(graph):
            if site.kind not in self.targets:
                continue
            where = f"{site.kind} input {site.value.name!r}"
            blockers = list(site.blockers)
            if any(hadamard_structure(r.weight) is not None for r in site.readers):
                blockers.append("already read through a Hadamard matrix")
            size = site.size
            matrix = None
            if not blockers and size is not None:
                try:
                    matrix = online_hadamard(size)
                except NoHadamardError as error:
                    blockers.append(str(error))
            if blockers or matrix is None or size is None:
                self.skipped[where] = blockers
                logger.info("online-hadamard: %s skipped: %s", where, "; ".join(blockers))
                continue
            plan.append((site, matrix / np.sqrt(size)))
        shared: dict[tuple[int, str], ir.Value] = {}  # one constant per order and dtype, read by every site
        for site, h in plan:
            uses = list(site.value.uses())
            matmul = self._hadamard_node(graph, site.value, h, shared, site.kind)
            for reader, index in uses:
                reader.replace_input_with(index, matmul.outputs[0])
            producer = site.value.producer()
            if producer is None:
                graph.insert_before(graph.node(0), matmul)
            else:
                graph.insert_after(producer, matmul)
            for linear in site.readers:
                rotate_input(graph, linear, h)
        rotated = self._rotate_scores(graph, shared) if "qk" in self.targets else 0
        if plan or rotated:
            model.metadata_props[self.marker] = ",".join(self.targets)
        return ir.passes.PassResult(model, modified=bool(plan) or rotated > 0)

    def _hadamard_node(
        self, graph: ir.Graph, value: ir.Value, h: np.ndarray, shared: dict[tuple[int, str], ir.Value], kind: str
    ) -> ir.Node:
        """``MatMul(value, H)`` (not yet placed in the graph), ``H`` one initializer per order and dtype."""
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        key = (h.shape[0], np.dtype(dtype).name)
        if key not in shared:
            shared[key] = add_initializer(graph, f"online_hadamard_{h.shape[0]}", h.astype(dtype))
        matmul = ir.node("MatMul", [value, shared[key]])
        matmul.outputs[0].name = f"{value.name or 'x'}_rotated"
        matmul.outputs[0].dtype, matmul.outputs[0].shape = value.dtype, value.shape
        matmul.metadata_props[self.marker] = kind
        return matmul

    def _rotate_scores(self, graph: ir.Graph, shared: dict[tuple[int, str], ir.Value]) -> int:
        """``Q -> Q H`` before every score product and ``K -> K H`` before its transpose (R3): the scores
        ``Q H H^T K^T`` are unchanged. Returns how many products were rotated."""
        rotated = 0
        for site in score_sites(graph):
            where = f"qk of {node_label(site.product)}"
            blockers = list(site.blockers)
            matrix = None
            if not blockers and site.head_dim is not None:
                try:
                    matrix = online_hadamard(site.head_dim) / np.sqrt(site.head_dim)
                except NoHadamardError as error:
                    blockers.append(str(error))
            if blockers or matrix is None or site.transpose is None:
                self.skipped[where] = blockers
                logger.info("online-hadamard: %s skipped: %s", where, "; ".join(blockers))
                continue
            for node, index in ((site.product, 0), (site.transpose, 0)):
                value = node.inputs[index]
                assert value is not None
                matmul = self._hadamard_node(graph, value, matrix, shared, "qk")
                graph.insert_before(node, matmul)
                node.replace_input_with(index, matmul.outputs[0])
            rotated += 1
        return rotated
