"""``qcompiler.compile``: model in, integer-only compiled code out; ``CompiledModel``, ``load``."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler import calibrate as calibration_module
from qcompiler import files
from qcompiler.config import Recipe, load_recipe
from qcompiler.errors import CalibrationError, QCompilerError, RecipeError, TargetError
from qcompiler.files import INTEGER_FILE, LIBRARY_FILE, OPENCL_FILE, QDQ_FILE, REPORT_FILE
from qcompiler.ir import load as load_model
from qcompiler.ir.analysis.architecture import describe
from qcompiler.ir.graph import set_dim_bounds
from qcompiler.ir.ort_session import serialize_sharing_weights
from qcompiler.passes.lower import float_islands, float_ops_inside
from qcompiler.passes.quantize import QuantizeQDQPass
from qcompiler.pipeline import PassRecord, Pipeline, format_records, run_onnxruntime
from qcompiler.progress import recording, step

if TYPE_CHECKING:  # the backend (TVM, and through it torch) is imported on the first build or load, not here
    from qcompiler.backends.tvm import TVMModule
    from qcompiler.backends.tvm.opencl import OpenCLModule

logger = logging.getLogger(__name__)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def calibration_batches(model: ir.Model, data: Any) -> Iterable[Any]:
    """Normalise the calibration argument into an iterable of batches.

    Accepted: an iterable of batches (dicts, tuples or arrays), or a mapping ``input name -> array`` (an
    ``.npz``) whose arrays are either one batch of the input's shape or a stack ``[num_batches, *shape]``.
    """
    if isinstance(data, Mapping) or (hasattr(data, "files") and hasattr(data, "__getitem__")):
        specs = calibration_module.input_specs(model)
        keys = list(data.files) if hasattr(data, "files") else list(data)
        names = [name for name, _, _ in specs]
        missing = [n for n in names if n not in keys]
        if missing:
            raise CalibrationError(f"calibration: no data for input(s) {missing}; the file has {keys}")
        arrays = {n: np.asarray(data[n]) for n in names}
        counts = set()
        for name, shape, _ in specs:
            extra = arrays[name].ndim - len(shape)
            if extra not in (0, 1):
                raise CalibrationError(
                    f"calibration: input {name!r} has shape {arrays[name].shape}; expected {shape} or "
                    f"[num_batches, *{shape}]"
                )
            counts.add(1 if extra == 0 else arrays[name].shape[0])
        if len(counts) != 1:
            raise CalibrationError(f"calibration: inputs hold different numbers of batches: {sorted(counts)}")
        count = counts.pop()
        stacked = {n: a if a.ndim > len(s) else a[None] for (n, s, _), a in zip(specs, arrays.values(), strict=True)}
        return [{n: stacked[n][i] for n in names} for i in range(count)]
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        raise CalibrationError(
            "calibration: a single array is ambiguous; pass a list of batches or a dict {input name: array}"
        )
    if not isinstance(data, Iterable):
        raise CalibrationError(f"calibration: expected an iterable of batches, got {type(data).__name__}")
    return data


def _static_input_shapes(model: ir.Model, sample: Mapping[str, np.ndarray] | None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for name, shape, _ in calibration_module.input_specs(model):
        if all(d is not None for d in shape):
            shapes[name] = [int(d) for d in shape]  # type: ignore[arg-type]
        elif sample is not None and name in sample:
            shapes[name] = list(sample[name].shape)
        else:
            raise CalibrationError(
                f"example_inputs: input {name!r} has dynamic shape {shape}; give example_inputs (or calibration "
                "as a list of batches) to fix the shape the code is compiled for"
            )
    return shapes


def _fix_input_shapes(model: ir.Model, shapes: Mapping[str, list[int]]) -> None:
    for value in model.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])


class CompiledModel:
    """An integer-only compiled model. Call it on numpy arrays or torch tensors.

    A model fresh from :func:`compile` holds its integer and QDQ graphs as IR sharing their tensors where the
    lowering kept them (no serialized copy of the weights; the fused GEMMs' weights are [N, K] transposes), and
    :attr:`integer_model` and :attr:`qdq_model` serialize them on each access; one from :func:`load` holds the
    protos it read."""

    def __init__(
        self,
        module: TVMModule | OpenCLModule,
        integer_model: onnx.ModelProto | ir.Model,
        report: dict[str, Any],
        qdq_model: onnx.ModelProto | ir.Model | None = None,
    ) -> None:
        self.module = module
        self._integer = integer_model
        self._qdq = qdq_model
        self.report = report
        if isinstance(integer_model, ir.Model):
            self.input_names = [str(v.name) for v in integer_model.graph.inputs]
            self.output_names = [str(v.name) for v in integer_model.graph.outputs]
        else:
            self.input_names = [i.name for i in integer_model.graph.input]
            self.output_names = [o.name for o in integer_model.graph.output]

    @property
    def integer_model(self) -> onnx.ModelProto:
        """The integer graph as ONNX (serialized now when held as IR)."""
        return _as_proto(self._integer)

    @property
    def qdq_model(self) -> onnx.ModelProto | None:
        """The QDQ graph it was lowered from as ONNX (serialized now when held as IR), if known."""
        return None if self._qdq is None else _as_proto(self._qdq)

    def _feeds(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        """Positional and named inputs -> numpy feeds checked against the compiled shapes; whether any was torch."""
        if len(args) + len(kwargs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} input(s) {self.input_names}")
        feeds = dict(zip(self.input_names, args, strict=False))
        unknown = set(kwargs) - set(self.input_names)
        if unknown:
            raise TypeError(f"unknown input name(s) {sorted(unknown)}; inputs are {self.input_names}")
        feeds.update(kwargs)
        as_torch = any(hasattr(v, "detach") for v in feeds.values())
        arrays = {n: _to_numpy(v) for n, v in feeds.items()}
        for name, shape in self.report["input_shapes"].items():
            if list(arrays[name].shape) != list(shape):
                raise ValueError(f"input {name!r}: shape {arrays[name].shape}, compiled for {tuple(shape)}")
        return arrays, as_torch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arrays, as_torch = self._feeds(args, kwargs)
        outputs = self.module.run(arrays)
        if as_torch:
            import torch

            outputs = [torch.from_numpy(o) for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def profile(self, *args: Any, repeat: int = 5, **kwargs: Any) -> list[dict[str, Any]]:
        """Time per kernel on these inputs (as for a call): one row per compiled kernel, slowest first, with
        ``kernel``, ``calls`` per run, ``ms`` (median per run over ``repeat`` runs) and ``share`` of the total
        (:meth:`qcompiler.backends.tvm.TVMModule.profile`). The CLI's ``qcompiler profile`` prints it."""
        arrays, _ = self._feeds(args, kwargs)
        return self.module.profile(arrays, repeat=repeat)

    def report_html(self, path: str | Path, *, profile: bool = True, repeat: int = 3, title: str | None = None) -> Path:
        """Write the self-contained HTML report (:mod:`qcompiler.report`): the pass pipeline, the op histogram,
        the per-layer SQNR against float, ranges and scales, and with ``profile`` the time per kernel (``repeat``
        runs on zero inputs). Returns ``path``."""
        from qcompiler.report import write_html, zero_inputs

        kernels = self.profile(repeat=repeat, **zero_inputs(self)) if profile else None
        return write_html(path, self.report, self.qdq_model, kernels, title or f"{self.report['recipe']} model")

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the library, the integer (and QDQ) ONNX and the report; atomically (all or nothing).

        Raises:
            FileExistsError: ``directory`` exists and ``overwrite`` is false.
        """
        with files.atomic_directory(directory, overwrite) as staging:
            self.module.export(staging / (OPENCL_FILE if self.module.where == "opencl" else LIBRARY_FILE))
            for name, text in self.module.sources.items():  # CUDA: kernels.cu and kernels.ptx
                (staging / name).write_text(text)
            _save_onnx(self._integer, staging / INTEGER_FILE)
            if self._qdq is not None:
                _save_onnx(self._qdq, staging / QDQ_FILE)
            (staging / REPORT_FILE).write_text(json.dumps(self.report, indent=2, default=str))
        return Path(directory)


#: a saved ONNX graph above this size keeps its tensors in a ``.data`` file beside it (protobuf's limit is 2 GiB)
EXTERNAL_DATA_BYTES = 1 << 30


def _as_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    """The model as a self-contained proto: an IR model's tensors kept in a file (:func:`_offload`) read in."""
    return ir.serde.serialize_model(_in_memory(model.clone())) if isinstance(model, ir.Model) else model


def _in_memory(model: ir.Model) -> ir.Model:
    """``model`` (edited in place) with any tensors kept in a file (:func:`_offload`) read into memory."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()):
        return ir.external_data.load_to_model(model)
    return model


#: a QDQ graph whose tensors pass this size is kept in a temporary file, memory-mapped, once lowering has read it
OFFLOAD_BYTES = 256 << 20


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _offload(model: ir.Model) -> ir.Model:
    """``model`` written to a temporary directory (its tensors in a ``.data`` file) and read back lazily: its
    tensors are memory-mapped from the file, resident only while read (a 1.1 B-parameter model's int8 weights
    are 1.1 GB). The directory goes when the returned model does."""
    import shutil
    import tempfile
    import weakref

    folder = Path(tempfile.mkdtemp(prefix="qcompiler-qdq-"))
    try:
        ir.save(model, folder / QDQ_FILE, external_data=f"{QDQ_FILE}.data")
        kept = ir.load(folder / QDQ_FILE)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(kept, shutil.rmtree, folder, True)
    return kept


def _save_onnx(model: onnx.ModelProto | ir.Model, path: Path) -> None:
    """``model`` to ``path``; above :data:`EXTERNAL_DATA_BYTES`, its tensors in ``<file>.data`` next to it (onnx_ir
    writes them without changing the in-memory model; ``onnx.load`` reads them back). IR is written without a
    proto of the whole model in memory."""
    if isinstance(model, ir.Model):
        if _initializer_bytes(model) > EXTERNAL_DATA_BYTES:
            ir.save(model, path, external_data=f"{path.name}.data")
        else:  # one file, tensors kept in a file (_offload) read in
            onnx.save(_as_proto(model), path)
        return
    if model.ByteSize() <= EXTERNAL_DATA_BYTES:
        onnx.save(model, path)
        return
    ir.save(ir.serde.deserialize_model(model), path, external_data=f"{path.name}.data")


def load(directory: str | Path, rpc: str | None = None) -> CompiledModel:
    """Reload a :meth:`CompiledModel.save` directory; with ``rpc`` (``"host:port:key"``, as for :func:`compile`),
    to run on that device: its library is uploaded to it on the first call."""
    from qcompiler.backends.tvm import TVMModule
    from qcompiler.backends.tvm.opencl import OpenCLModule
    from qcompiler.backends.tvm.remote import Device, Tracker

    root = Path(directory)
    library = OPENCL_FILE if (root / OPENCL_FILE).is_file() else LIBRARY_FILE
    for name in (library, INTEGER_FILE, REPORT_FILE):
        if not (root / name).is_file():
            raise QCompilerError(f"directory: {root} is not a saved qcompiler model ({name} is missing)")
    integer_model = onnx.load(str(root / INTEGER_FILE))
    report = json.loads((root / REPORT_FILE).read_text())
    names = [i.name for i in integer_model.graph.input]
    dtypes = [
        onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in integer_model.graph.input
    ]
    remote = Device(Tracker.parse(rpc)) if rpc is not None else None
    module: TVMModule | OpenCLModule
    if library == OPENCL_FILE:
        module = OpenCLModule.load(root / OPENCL_FILE)
    else:
        kind = "cuda" if report.get("target_kind") == "cuda" else "cpu"
        module = TVMModule.load(root / LIBRARY_FILE, names, dtypes, remote, kind)
    qdq = onnx.load(str(root / QDQ_FILE)) if (root / QDQ_FILE).is_file() else None
    return CompiledModel(module, integer_model, report, qdq)


def lowers_by_tables(recipe: Recipe) -> bool:
    """Whether the recipe's integer lowering turns SiLU, Sigmoid and Gelu into lookup tables (``tables = true``)."""
    return any(spec.name == "lower-qdq-to-integer" and spec.options.get("tables", False) for spec in recipe.lower)


@dataclasses.dataclass(frozen=True)
class AutoChoice:
    """What an ``[auto]`` recipe found and chose: the architecture kind, the recipe, and the facts behind it."""

    auto: str
    kind: str
    recipe: str
    facts: dict[str, int]


@dataclasses.dataclass
class _QDQResult:
    model: ir.Model
    records: list[PassRecord]
    shapes: dict[str, list[int]]
    recipe: Recipe  # the recipe used (an [auto] recipe's choice)
    choice: AutoChoice | None
    #: SQNR of every quantized activation against float on one calibration batch (ir/analysis/layer_error.py)
    layers: list[dict[str, Any]] | None = None


def quantize_to_integer(
    model: Any,
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    calibration: Any = None,
    recipe: str | Path | Recipe = "w8a8",
    verify: bool = True,
    progress: bool = True,
) -> tuple[ir.Model, ir.Model, list[PassRecord], dict[str, list[int]]]:
    """Run the front half of :func:`compile`: canonicalize, calibrate, quantize (QDQ), lower, fuse.

    Returns (qdq model, integer model, pass records, static input shapes).
    """
    result = _quantize_to_integer(model, example_inputs, calibration, load_recipe(recipe), verify, progress)
    return result.qdq_ir(), result.model, result.records, result.shapes


@dataclasses.dataclass
class _IntegerResult(_QDQResult):
    #: the QDQ model before lowering (which edits the graph in place): a clone of its graph, the tensors shared
    qdq: ir.Model | None = None

    def qdq_ir(self) -> ir.Model:
        """The QDQ model (a clone: the caller may edit it; the tensors are shared, not copied, or read in from
        the file an offloaded graph keeps them in, which goes with this result)."""
        assert self.qdq is not None
        return _in_memory(self.qdq.clone())


def _quantize_to_integer(
    model: Any,
    example_inputs: Any,
    calibration: Any,
    chosen: Recipe,
    verify: bool,
    progress: bool,
    float_islands: bool = False,
    layer_errors: bool = False,
    cache_inputs: frozenset[str] = frozenset(),
    dim_bounds: Mapping[str, int] | None = None,
    keep_qdq: bool = True,
) -> _IntegerResult:
    """``keep_qdq``: keep the QDQ graph (the result's ``qdq``) for callers that save or report it; a large one is
    written to a temporary file, which callers without use for it need not pay for."""
    qdq = _quantize_qdq(model, example_inputs, calibration, chosen, verify, progress, float_islands, layer_errors,
                        cache_inputs, dim_bounds)  # fmt: skip
    kept = None
    if keep_qdq:
        with step("keep the QDQ graph (tensors shared)", False):
            kept = qdq.model.clone()
            if _initializer_bytes(kept) > OFFLOAD_BYTES:  # lowering replaces the fused GEMMs' codes: not held twice
                kept = _offload(kept)
    with step("lower to integer ops", progress):
        lowered = Pipeline([spec.build() for spec in qdq.recipe.lower], verify_each=verify).run(qdq.model)
    records = qdq.records + list(lowered.records)
    return _IntegerResult(lowered.model, records, qdq.shapes, qdq.recipe, qdq.choice, layers=qdq.layers, qdq=kept)


def _calibrator(batches: Any, max_batches: int | None, progress: bool) -> Callable[[ir.Model], Any]:
    """Statistics of a graph mid-pipeline, for passes that choose their transform from data (AWQ, KLT)."""

    def calibrate(model: ir.Model) -> calibration_module.ActivationRanges:
        return calibration_module.observe(model, batches, progress=progress, max_batches=max_batches, hessians=True)

    return calibrate


@dataclasses.dataclass
class _Calibrated:
    """A model canonicalized by its recipe and calibrated: what quantization starts from."""

    model: ir.Model
    ranges: Any  # calibrate.Ranges
    batches: Any
    shapes: dict[str, list[int]]
    recipe: Recipe  # the recipe used (an [auto] recipe's choice)
    choice: AutoChoice | None
    records: list[PassRecord]


def _canonical_calibrated(
    model: Any,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None,
    calibration: Any,
    chosen: Recipe,
    verify: bool,
    progress: bool,
    dim_bounds: Mapping[str, int] | None = None,
    hessians: bool = False,
) -> _Calibrated:
    """Load, canonicalize (an ``[auto]`` recipe chooses its recipe after canonicalizing) and calibrate;
    ``hessians``: the linears' input Hessians even where the recipe does not need them."""
    torch_args = list(example_inputs) if isinstance(example_inputs, list | tuple) else None
    ir_model = load_model(model, torch_args if torch_args is not None else None, progress=progress)
    sample = None
    if example_inputs is not None:
        sample = calibration_module.as_feeds(ir_model, example_inputs, argument="example_inputs")
    if calibration is None:
        if sample is None:
            raise CalibrationError(
                "calibration: required (an iterable of representative batches or a dict of arrays); "
                "example_inputs alone give poor ranges but are accepted as a last resort"
            )
        logger.warning("no calibration data: calibrating on example_inputs only")
        calibration = [sample]
    batches = calibration_batches(ir_model, calibration)
    if sample is None and isinstance(batches, list) and batches:
        sample = calibration_module.as_feeds(ir_model, batches[0])  # fixes dynamic dims to the data's
    shapes = _static_input_shapes(ir_model, sample)
    if dim_bounds is None:
        _fix_input_shapes(ir_model, shapes)
    else:
        set_dim_bounds(ir_model.graph, dim_bounds)
    records: list[PassRecord] = []
    choice = None
    passes = [spec.build() for spec in chosen.canonicalize]
    if any(getattr(p, "needs_calibration", False) for p in passes):
        batches = list(batches)  # calibrated passes observe the data again
    probe = next(iter(batches), None) if verify and isinstance(batches, list) else None
    with step("canonicalize", progress):
        canonical = Pipeline(
            passes,
            verify_each=verify,
            probe_inputs=calibration_module.as_feeds(ir_model, probe) if probe is not None else None,
            rtol=1e-4,
            atol=1e-4,
            runner=run_onnxruntime,
            calibrate=_calibrator(batches, chosen.calibration.max_batches, progress),
        ).run(ir_model)
    records += canonical.records
    if chosen.auto:
        architecture = describe(canonical.model.graph)
        auto = chosen
        chosen = auto.choose(architecture.kind)
        choice = AutoChoice(auto.name, architecture.kind, chosen.name, dataclasses.asdict(architecture))
        logger.info("recipe %s: %s, so %s (%s)", auto.name, architecture.kind, chosen.name, choice.facts)
    cal = chosen.calibration
    with step("calibrate", False):  # recorded only: the batches' bar is the progress
        ranges = calibration_module.observe(
            canonical.model,
            batches,
            observer=cal.observer,
            percentile=cal.percentile,
            progress=progress,
            max_batches=cal.max_batches,
            hessians=hessians
            or chosen.quantize.weight_quantizer == "gptq"
            or bool(chosen.quantize.migration_alpha_grid),
        )
    return _Calibrated(canonical.model, ranges, batches, shapes, chosen, choice, records)


def _quantize_qdq(
    model: Any,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None,
    calibration: Any,
    chosen: Recipe,
    verify: bool,
    progress: bool,
    float_islands: bool = False,
    layer_errors: bool = False,
    cache_inputs: frozenset[str] = frozenset(),
    dim_bounds: Mapping[str, int] | None = None,
) -> _QDQResult:
    """Canonicalize, calibrate and quantize to QDQ (an ``[auto]`` recipe chooses its recipe after canonicalizing);
    with ``layer_errors``, also the per-layer SQNR against float on the first calibration batch (if a list).

    ``dim_bounds`` (symbol -> largest value) keeps the model's symbolic dimensions through the passes (one graph
    for every sequence length up to the bound) instead of fixing them to the first batch's; ``cache_inputs``
    names the KV-cache inputs (:class:`QuantizeQDQPass`)."""
    calibrated = _canonical_calibrated(model, example_inputs, calibration, chosen, verify, progress, dim_bounds)
    canonical_model, ranges, batches = calibrated.model, calibrated.ranges, calibrated.batches
    shapes, chosen, choice, records = calibrated.shapes, calibrated.recipe, calibrated.choice, calibrated.records
    layer_probe = None
    if layer_errors:  # QuantizeQDQPass edits the float model in place: the probe keeps a copy
        from qcompiler.ir.analysis.layer_error import LayerErrorProbe

        with step("per-layer error: float reference", False):
            layer_probe = LayerErrorProbe.capture(canonical_model, batches)
    with step(f"quantize ({chosen.quantize.weight_quantizer} weights, QDQ)", progress):
        quantized = Pipeline(
            [
                QuantizeQDQPass(
                    ranges.thresholds,
                    chosen.quantize,
                    ranges.channel_absmax,
                    ranges.hessians,
                    float_islands=float_islands,
                    cache_inputs=cache_inputs,
                ),
                RemoveUnusedNodesPass(),
            ],
            verify_each=verify,
        ).run(canonical_model)
    records += quantized.records
    layers = None
    if layer_probe is not None:
        with step("per-layer error against float", progress):
            layers = layer_probe.measure(quantized.model, ranges.thresholds)
    return _QDQResult(quantized.model, records, shapes, chosen, choice, layers)


def choose_layer_bits(
    model: Any,
    *,
    calibration: Any,
    recipe: str | Path | Recipe = "w4a8",
    size_ratio: float = 1.1,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    verify: bool = False,
    progress: bool = True,
) -> tuple[Recipe, list[Any]]:
    """Mixed precision (HAWQ-V3's integer program): each linear layer's weight bits, 4 or 8, minimising the summed
    output error on the calibration inputs within ``size_ratio`` times the weight bytes of every layer at 4 bits
    (passes/quantize/mixed.py). Returns ``recipe`` with the choice in ``quantize.layer_weight_bits`` (compile with
    it, or save its table to a TOML recipe) and the layers' costs.

    Raises:
        RecipeError: the recipe has no integer path or ``size_ratio`` is below 1.
    """
    from qcompiler.passes.quantize.mixed import as_layer_weight_bits, choose_layer_bits, layer_costs

    chosen = load_recipe(recipe)
    if chosen.simulate is not None or chosen.auto:
        raise RecipeError(f"recipe: {chosen.name!r}: choose_layer_bits needs an integer-path recipe (w4a8, w8a8-llm)")
    if size_ratio < 1.0:
        raise RecipeError(f"size_ratio: {size_ratio} is below 1 (every layer at 4 bits)")
    calibrated = _canonical_calibrated(model, example_inputs, calibration, chosen, verify, progress, hessians=True)
    base = dataclasses.replace(chosen.quantize, weight_bits=4, layer_weight_bits=())
    costs = layer_costs(calibrated.model.graph, calibrated.ranges.hessians, base)
    budget = int(size_ratio * sum(c.sizes[4] for c in costs))
    table = as_layer_weight_bits(choose_layer_bits(costs, budget), default=4)
    quantize = dataclasses.replace(base, layer_weight_bits=table)
    name = f"{chosen.name}-mixed-{size_ratio:g}"
    return dataclasses.replace(chosen, name=name, quantize=quantize), costs


def simulate(
    model: Any,
    *,
    calibration: Any,
    recipe: str | Path | Recipe = "w4a8-dynamic",
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    verify: bool = True,
    progress: bool = True,
    nonlinearities: str = "float",
) -> ir.Model:
    """Float simulation of a recipe: a float ONNX model any runtime executes, to measure what the recipe costs
    in accuracy.

    An integer-path recipe (``w8a8``, ``w4a8``, ...) gives its QDQ graph: the exact weights and static activation
    scales the integer code uses, with float nonlinearities. With ``nonlinearities="integer"``, its softmax,
    norms, GELU and SiLU are the integer code's own (``qcompiler`` ops, run by
    :func:`qcompiler.dialect.run_reference`; I-BERT's simulation): every op of the compiled model then agrees
    with it within one quantization step per element (:func:`qcompiler.testing.compare_lowering`). A
    ``[simulate]`` recipe (``w4a8-dynamic``, ``w4a4``) canonicalizes (rotations included), then replaces weights
    by their RTN/GPTQ values and fake-quantizes linear inputs per token.

    Raises:
        CalibrationError: no calibration data.
        ValueError: ``nonlinearities`` is not ``"float"`` or ``"integer"``, or ``"integer"`` with a
            ``[simulate]`` recipe (its per-token activations have no integer form).
    """
    from qcompiler.passes.lower import LowerNonlinearitiesPass
    from qcompiler.passes.quantize.fake import FakeQuantizePass

    if nonlinearities not in ("float", "integer"):
        raise ValueError(f"nonlinearities: {nonlinearities!r}; use 'float' or 'integer'")
    chosen = load_recipe(recipe)
    if nonlinearities == "integer" and chosen.simulate is not None:
        raise ValueError(
            f"nonlinearities='integer': recipe {chosen.name!r} is a float-only simulation with no integer "
            "lowering; use an integer-path recipe (w8a8, w8a8-llm, w4a8)"
        )
    if chosen.simulate is None:
        result = _quantize_qdq(model, example_inputs, calibration, chosen, verify, progress)
        if nonlinearities == "integer":  # as the recipe's lowering does them (I-BERT kernels, or tables)
            LowerNonlinearitiesPass(tables=lowers_by_tables(result.recipe))(result.model)
        return result.model
    if calibration is None:
        raise CalibrationError("calibration: required (an iterable of representative batches)")
    torch_args = list(example_inputs) if isinstance(example_inputs, list | tuple) else None
    ir_model = load_model(model, torch_args)
    batches = list(calibration_batches(ir_model, calibration))
    probe = calibration_module.as_feeds(ir_model, batches[0]) if verify and batches else None
    canonical = Pipeline(
        [spec.build() for spec in chosen.canonicalize],
        verify_each=verify,
        probe_inputs=probe,
        rtol=1e-4,
        atol=1e-4,
        runner=run_onnxruntime,
        calibrate=_calibrator(batches, None, progress),
    ).run(ir_model)
    hessians = None
    if chosen.simulate.weight_quantizer == "gptq" or chosen.simulate.weight.clip_objective == "output":
        hessians = calibration_module.observe(canonical.model, batches, progress=progress, hessians=True).hessians
    FakeQuantizePass(chosen.simulate, hessians)(canonical.model)
    return canonical.model


def compile(
    model: Any,
    target: Any = "llvm",
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    calibration: Any = None,
    recipe: str | Path | Recipe = "auto",
    verify: bool = True,
    progress: bool = True,
    tune: bool = False,
    metaschedule_trials: int = 0,
    integer_only: bool = True,
    rpc: str | None = None,
) -> CompiledModel:
    """Quantize ``model`` and compile it to integer-only code for ``target``.

    Args:
        model: ``torch.nn.Module``, ONNX path, ``onnx.ModelProto`` or ``onnx_ir.Model``.
        target: ``"llvm"`` (this CPU) or a ``tvm.target.Target`` of kind llvm; ``"cuda"`` (this machine's GPU, else
            sm_80) or ``{"kind": "cuda", "arch": "sm_90"}``: NVIDIA GPUs, built with nvcc (``save`` writes
            ``kernels.cu`` and ``kernels.ptx`` beside the library; it runs where a CUDA GPU is); ``"opencl"``: run
            through pyopencl on this machine's OpenCL device (a GPU, else PoCL or Oclgrind on the CPU).
        example_inputs: one input batch; required for torch modules and for dynamic input shapes.
        calibration: representative data: an iterable of batches or a dict ``{input: stacked batches}``.
        recipe: a built-in recipe name (``w8a8``) or a TOML recipe path. The default, ``auto``, chooses one from
            the graph's structure after canonicalization (causal decoders ``w8a8-llm``, depthwise CNNs and mobile
            hybrids ``w8a16``, other attention models ``w8a8-percentile``, the rest ``w8a8``); ``report["auto"]``
            says what it found and chose.
        verify: check the IR after every pass.
        progress: show progress bars.
        tune: time the candidate register tiles of every int8 GEMM shape on this machine and keep the fastest,
            cached on disk (``$QCOMPILER_CACHE_DIR``, default ``~/.cache/qcompiler``) for the next build; a few
            seconds per new shape.
        metaschedule_trials: above 0, a MetaSchedule search of that many trials over the kernels without a hand
            GEMM schedule, each kept only where it beats the hand schedule (records in
            ``$QCOMPILER_CACHE_DIR/metaschedule``); minutes on 2 cores, so off by default.
        integer_only: True (the default): a node the integer path cannot handle is refused by name
            (``UnsupportedOpError``). False: such nodes stay in float between a DequantizeLinear and a
            QuantizeLinear (float islands), so the model still compiles and runs; ``report["float_islands"]``
            lists each by node, op and reason.
        rpc: ``"host:port:key"``: a TVM RPC tracker and the key of the device servers registered with it. The
            code is built here for that device (``target="llvm"`` then means the device's CPU, read through the
            session), the tiles (``tune``) and MetaSchedule's trials are timed there, and the returned model runs
            there (inputs copied to it, outputs back); ``report["device"]`` names it. Same architecture as this
            machine (its linker links the library).

    Raises:
        TargetError, RecipeError, ModelLoadError, CalibrationError, UnsupportedOpError: with what to fix.
    """
    from qcompiler.backends.tvm import build, resolve_target
    from qcompiler.backends.tvm.metaschedule import validate_trials
    from qcompiler.backends.tvm.remote import Device, Tracker

    tvm_target, _ = resolve_target(target)  # fail on a bad target, trial count, recipe or device before any work
    if tvm_target.kind.name != "llvm" and (tune or metaschedule_trials or rpc is not None):
        raise TargetError(
            f"target {tvm_target.kind.name}: tune, metaschedule_trials and rpc are CPU-only for now; build without them"
        )
    tracker = Tracker.parse(rpc) if rpc is not None else None
    validate_trials(metaschedule_trials)
    chosen = load_recipe(recipe)
    remote = Device(tracker) if tracker is not None else None
    if remote is not None and isinstance(target, str) and target in ("llvm", "cpu"):
        tvm_target, _ = resolve_target(remote.target())  # "llvm" is the device's CPU
    if chosen.simulate is not None:
        raise RecipeError(
            f"recipe {chosen.name!r} is a float simulation ([simulate]: low-bit weights, per-token activations) "
            "with no integer lowering; run it with qcompiler.simulate, or compile with w8a8, w8a8-llm or w4a8"
        )
    start = time.perf_counter()
    with recording() as stages:
        result = _quantize_to_integer(
            model, example_inputs, calibration, chosen, verify, progress, not integer_only, layer_errors=True
        )
        integer, records, shapes = result.model, result.records, result.shapes
        assert result.qdq is not None
        remaining = float_ops_inside(integer)
        if remaining:
            raise QCompilerError(f"internal: float ops remain in the integer graph: {remaining}")
        with step("serialize for the build (weights shared)", False):
            integer_proto, weights = serialize_sharing_weights(integer)
        ops = _op_histogram(integer_proto)
        build_start = time.perf_counter()
        module = build(
            integer_proto,
            shapes,
            tvm_target,
            tune=tune,
            metaschedule_trials=metaschedule_trials,
            progress=progress,
            remote=remote,
            weights=weights,
        )
        del integer_proto, weights
    report = {
        "recipe": result.recipe.name,
        "auto": dataclasses.asdict(result.choice) if result.choice is not None else None,
        "target": str(tvm_target),
        "target_kind": tvm_target.kind.name,
        "device": module.where,
        "input_shapes": shapes,
        "passes": [r.as_dict() for r in records],
        "ops": ops,
        "float_ops_inside": 0,
        "float_islands": float_islands(integer),
        "tuned": tune,
        "metaschedule_trials": metaschedule_trials,
        "seconds": {"passes": build_start - start, "build": time.perf_counter() - build_start},
        "stages": stages,
        "peak_rss_mb": max((s["peak_rss_mb"] for s in stages if s["peak_rss_mb"] is not None), default=None),
    }
    if result.layers is not None:
        report["layers"] = result.layers
    logger.info("compiled in %.2fs\n%s", time.perf_counter() - start, format_records(records))
    return CompiledModel(module, integer, report, result.qdq)


def _op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts
