"""Build an integer ONNX model into a TVM module for the host CPU, run it, export and reload it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.backend import cpu_generic

from qcompiler.backends.tvm import importer, metaschedule, schedules, tuning
from qcompiler.backends.tvm.remote import Device
from qcompiler.errors import TargetError
from qcompiler.logs import native_stderr_routed
from qcompiler.progress import step

if TYPE_CHECKING:
    from qcompiler.backends.tvm.opencl import OpenCLModule

logger = logging.getLogger(__name__)


@functools.cache
def host_cpu_features() -> frozenset[str]:
    """x86 feature flags of this machine (empty off Linux/x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_target(target: str | Mapping[str, Any] | tvm.target.Target) -> tuple[tvm.target.Target, bool]:
    """The TVM target for ``target`` and whether the AVX2 int8 intrinsics may be used.

    ``"llvm"`` (or ``"cpu"``) means this machine: its CPU name from LLVM and its core count. ``"cuda"`` (or
    ``{"kind": "cuda", "arch": "sm_90"}``) and ``"opencl"``: the GPU targets (:mod:`qcompiler.backends.tvm.gpu`);
    the flag is then False.

    Raises:
        TargetError: an unknown target name or kind; a CUDA arch we do not build for, or no nvcc; no pyopencl or
            no working OpenCL device.
    """
    from qcompiler.backends.tvm import gpu

    kind = (
        target.kind.name
        if isinstance(target, tvm.target.Target)
        else str(target.get("kind", ""))
        if isinstance(target, Mapping)
        else target
    )
    if kind in ("cuda", "gpu"):
        spec = "cuda" if kind == "gpu" else target
        if isinstance(spec, tvm.target.Target):
            spec = {k: v for k, v in spec.export().items() if k != "host"}
        return gpu.cuda_target(spec), False
    if kind == "opencl":
        return gpu.opencl_target(target if isinstance(target, str | Mapping) else dict(target.export())), False
    if isinstance(target, tvm.target.Target):
        tvm_target = target
    elif isinstance(target, Mapping):
        tvm_target = tvm.target.Target(dict(target))
    elif target in ("llvm", "cpu"):
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        tvm_target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    else:
        raise TargetError(
            f"target: unknown target {target!r}; use 'llvm' (this CPU), 'cuda', 'opencl' or a tvm.target.Target"
        )
    if tvm_target.kind.name != "llvm":
        raise TargetError(f"target: kind {tvm_target.kind.name!r} is not supported; use 'llvm', 'cuda' or 'opencl'")
    return tvm_target, int8_dot_isa(tvm_target) != "generic"


def _foreign(target: tvm.target.Target) -> bool:
    """Whether the target's triple names another architecture than x86 (AArch64 NEON, RISC-V, ...)."""
    triple = str(target.attrs.get("mtriple", ""))
    return bool(triple) and not triple.startswith(("x86_64", "i386", "i686", "amd64"))


#: CPUs with AVX-512 VNNI (the 512-bit vpdpbusd / vpdpwssd the int8 GEMMs use)
_VNNI_MCPUS = (
    "cascadelake", "cooperlake", "icelake", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "znver4", "znver5",
)  # fmt: skip


def int8_dot_isa(target: tvm.target.Target) -> str:
    """``"avx512vnni"`` when the target CPU has AVX-512 VNNI and VL (this machine's flags for ``"llvm"``, else its
    ``mcpu``), ``"avx2"`` when it has AVX2, else ``"generic"`` (also every non-x86 ``mtriple``: LLVM vectorizes
    the int32 lanes for it): which int8 dot intrinsic the GEMMs use. Code for a VNNI ``mcpu`` compiles anywhere
    and runs only on such CPUs; code for another architecture compiles (export it with that architecture's
    toolchain) and is not run here. AMX CPUs (Sapphire Rapids on) get the VNNI kernel: no AMX tile kernel is
    generated (it needs a tile configuration per kernel and the kernel's permission to use the tile state, and
    no machine of this project can run it to check it bit-exact)."""
    if _foreign(target):
        return "generic"  # vectorized by LLVM for the target (NEON on AArch64); no x86 dot intrinsic
    mcpu = str(target.attrs.get("mcpu", ""))
    host = tvm.target.codegen.llvm_get_system_cpu()
    if mcpu in ("", host):
        flags = host_cpu_features()
        if {"avx512_vnni", "avx512vl"} <= flags and host.startswith(_VNNI_MCPUS):  # LLVM must know the CPU too
            return "avx512vnni"
        return "avx2" if "avx2" in flags else "generic"
    if mcpu.startswith(_VNNI_MCPUS):
        return "avx512vnni"
    return "avx2" if _mcpu_has_avx2(mcpu) else "generic"


def _mcpu_has_avx2(mcpu: str) -> bool:
    prefixes = (
        "haswell",
        "broadwell",
        "skylake",
        "cascadelake",
        "icelake",
        "tigerlake",
        "sapphirerapids",
        "alderlake",
        "znver",
        "x86-64-v3",
        "x86-64-v4",
        "cooperlake",
        "cannonlake",
        "rocketlake",
    )
    return mcpu.startswith(prefixes)


def configure_threads() -> None:
    """Set TVM's thread count, when a build or a run starts (not at import: the user's process is theirs until then).

    TVM's thread pool defaults to half the logical CPUs (it assumes two hyper-threads per core), which on 2-vCPU
    machines means one thread: parallel kernels then only pay the pool's overhead. Use every CPU this process may
    run on unless the user chose (``TVM_NUM_THREADS``). The pool reads it once, when it starts."""
    if "TVM_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(cpus)


class TVMModule:
    """A built integer model: call :meth:`run` with numpy feeds."""

    def __init__(
        self,
        executable: Any,
        input_names: list[str],
        input_dtypes: list[str],
        remote: Device | None = None,
        device_kind: str = "cpu",
    ) -> None:
        self.executable = executable
        self.input_names = input_names
        self.input_dtypes = input_dtypes
        self.remote = remote  # a device behind a TVM RPC tracker (remote.py): runs and timings happen there
        self.device_kind = device_kind  # "cpu" or "cuda": where the kernels run
        self.sources: dict[str, str] = {}  # generated code saved beside the library (CUDA: kernels.cu, kernels.ptx)
        self._vm_main: tuple[Any, Any] | None = None  # loaded on the first run: code for another CPU never is
        self._staging: dict[str, Any] = {}  # one reusable device tensor per input: no allocation per call
        self._library: Path | None = None  # the file it was loaded from: uploaded as it is to a remote device

    @property
    def device(self) -> Any:
        if self.remote is not None:
            return self.remote.tvm_device
        if self.device_kind == "cuda":
            if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
                raise TargetError(
                    "this model was built for CUDA and this machine has no CUDA GPU (or no driver): save() it and "
                    "load() it on a machine with one; its kernels.ptx shows the code"
                )
            return tvm.cuda(0)
        return tvm.cpu()

    @property
    def where(self) -> str:
        """Where the code runs: ``"local"`` or ``"rpc:host:port:key"``."""
        return f"rpc:{self.remote.tracker}" if self.remote is not None else "local"

    def _loaded(self) -> tuple[Any, Any]:
        """The VM and its ``main``, created on first use (on the remote device: after uploading the library)."""
        if self._vm_main is None:
            if self.remote is None:
                configure_threads()
                vm = relax.VirtualMachine(self.executable, self.device)
            else:
                code = self.remote.load_file(self._library) if self._library else self.remote.load(self.executable)
                vm = relax.VirtualMachine(code, self.remote.tvm_device)
            self._vm_main = (vm, vm["main"])
        return self._vm_main

    def _arguments(self, feeds: Mapping[str, np.ndarray]) -> list[Any]:
        args = []
        for name, dtype in zip(self.input_names, self.input_dtypes, strict=True):
            if isinstance(feeds[name], tvm.runtime.Tensor) and self.remote is None:
                args.append(feeds[name])  # the caller's tensor on this device, as it is (a KV cache: no copy)
                continue
            array = np.ascontiguousarray(feeds[name], dtype=dtype)
            staged = self._staging.get(name)
            if staged is None or tuple(staged.shape) != array.shape:
                staged = self._staging[name] = tvm.runtime.tensor(array, self.device)
            else:
                staged.copyfrom(array)
            args.append(staged)
        return args

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on numpy feeds (not thread-safe: the input staging tensors are reused)."""
        result = self._loaded()[1](*self._arguments(feeds))
        if isinstance(result, tvm.runtime.Tensor):
            return [result.numpy()]
        return [r.numpy() for r in result]

    def time(self, feeds: Mapping[str, np.ndarray], number: int = 10, repeat: int = 5) -> float:
        """Median seconds per call (TVM's time evaluator), after warm-up calls for at least 50 ms: the first calls
        of a freshly built module fault its constant pages in and wake the thread pool (measured 3x slower)."""
        args = self._arguments(feeds)
        start = time.perf_counter()
        for _ in range(1000):
            self._loaded()[1](*args)
            if time.perf_counter() - start > 0.05:
                break
        timer = self._loaded()[0].time_evaluator("main", self.device, number=number, repeat=repeat)
        return float(timer(*args).median)

    def profile(self, feeds: Mapping[str, np.ndarray], repeat: int = 5) -> list[dict[str, Any]]:
        """Where a call's time goes: one row per kernel (the VM's calls of it, builtins included), with its calls
        per run, its median milliseconds per run over ``repeat`` runs and its share of their sum, slowest first.
        Timed around each call the VM makes (a Python hook per call: the sum runs a little above :meth:`time`).
        """
        if repeat < 1:
            raise ValueError(f"profile: repeat must be at least 1, got {repeat}")
        if self.remote is not None:
            raise TargetError(
                f"profile: the model runs on {self.where}; per-kernel timing hooks a Python function into the VM, "
                "which RPC cannot carry. Use time() (the whole call, timed on the device), or profile a local build"
            )
        vm = relax.VirtualMachine(self.executable, self.device)
        args = self._arguments(feeds)
        vm["main"](*args)  # warm-up: constant pages, thread pool
        runs: list[dict[str, list[float]]] = []
        started: list[float] = []

        def instrument(func: Any, symbol: str, before: bool, ret: Any, *call_args: Any) -> int:
            if before:
                started.append(time.perf_counter())
            else:
                runs[-1].setdefault(str(symbol), []).append(time.perf_counter() - started.pop())
            return 0  # VMInstrumentReturnKind.kNoOp

        vm.set_instrument(tvm.runtime.convert(instrument))
        for _ in range(repeat):
            runs.append({})
            vm["main"](*args)
        names = {name for run in runs for name in run}
        times = {name: float(np.median([sum(run.get(name, [])) for run in runs])) * 1e3 for name in names}
        total = sum(times.values()) or 1.0
        order = sorted(names, key=lambda name: -times[name])
        return [
            {"kernel": name, "calls": len(runs[0].get(name, [])), "ms": times[name], "share": times[name] / total}
            for name in order
        ]

    def export(self, path: str | Path) -> None:
        if self._library is not None:  # loaded from a library: TVM cannot re-export one, and the file is the same
            shutil.copyfile(self._library, path)
            return
        with native_stderr_routed():  # the runtime warns once per memory scope it saves
            self.executable.export_library(str(path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        input_names: list[str],
        input_dtypes: list[str],
        remote: Device | None = None,
        device_kind: str = "cpu",
    ) -> TVMModule:
        """A library written by :meth:`export`, run here or, with ``remote``, on that device. A CUDA library built
        where no CUDA driver was carries CUDA C: nvcc compiles it now for this machine's GPU."""
        from qcompiler.backends.tvm.gpu import nvcc_compiles_cuda

        hook = nvcc_compiles_cuda() if device_kind == "cuda" else contextlib.nullcontext()
        with native_stderr_routed(), hook:  # and once per memory scope it loads
            module = tvm.runtime.load_module(str(path))
        loaded = cls(module, input_names, input_dtypes, remote, device_kind)
        loaded._library = Path(path)
        return loaded

    def llvm_ir(self) -> str:
        """LLVM IR of the host module (the kernels); for the integer-only check."""
        module = self.executable.mod
        parts = [str(module.inspect_source("ll"))]
        parts.extend(str(lib.inspect_source("ll")) for lib in module.imports)
        return "\n".join(parts)


def _without_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes as initializers: TVM's importer reads only a Constant's ``value`` attribute, and folding
    leaves ``value_ints`` / ``value_float`` ones (Reshape shapes). The caller's model is not changed."""
    if not any(node.op_type == "Constant" for node in model.graph.node):
        return model
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    lifted = ir.serde.deserialize_model(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(lifted)
    return ir.serde.serialize_model(lifted)


def build(
    model: onnx.ModelProto,
    shapes: Mapping[str, list[int]],
    target: Any = "llvm",
    tune: bool = False,
    tile_cache: tuning.TileCache | None = None,
    conv_layout: str = "auto",
    metaschedule_trials: int = 0,
    progress: bool = False,
    remote: Device | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
) -> TVMModule | OpenCLModule:
    """Import, schedule and compile ``model`` (integer ONNX) for ``target`` with static input ``shapes``.
    GPU targets (``cuda``, ``opencl``) are built by :func:`qcompiler.backends.tvm.gpu.build_gpu`.

    ``tune``: search the GEMM register tile of every int8 GEMM shape on this machine (tuning.py), reusing and
    extending ``tile_cache`` (default: the on-disk cache); without it the default tiles, and no cache is read.
    ``conv_layout``: the im2col layout of group-1 convolutions, ``"NCHW"``, ``"NHWC"`` (permuted at the graph's
    NCHW boundary, the permutes between consecutive NHWC convolutions dropped) or ``"auto"``: per convolution,
    whichever measured faster for its shape (:func:`qcompiler.backends.tvm.importer.conv_layout_for`).
    ``metaschedule_trials``: above 0, a MetaSchedule search of that many trials over the kernels without a hand GEMM
    schedule, each kept only where it beats the hand schedule (metaschedule.py; minutes: off by default).
    ``progress``: one line per stage (import, schedules, code generation), a bar over the kernels scheduled.
    ``remote``: a device behind a TVM RPC tracker (remote.py): the tiles and MetaSchedule's trials are timed there,
    and the module runs there; ``target`` should then be the device's (:meth:`Device.target`).
    ``weights``: the arrays of ``model``'s external initializers (:func:`importer.import_onnx`).
    """
    configure_threads()
    trials = metaschedule.validate_trials(metaschedule_trials)
    tvm_target, _ = resolve_target(target)
    model = _without_constant_nodes(model)
    static = {k: list(v) for k, v in shapes.items()}
    if tvm_target.kind.name != "llvm":
        if tune or trials or remote is not None:
            raise TargetError(
                f"target {tvm_target.kind.name}: tune, metaschedule_trials and rpc are CPU-only for now; "
                "build without them"
            )
        from qcompiler.backends.tvm.gpu import build_gpu

        return build_gpu(model, static, tvm_target, weights=weights, progress=progress)
    isa = int8_dot_isa(tvm_target)
    gemms: set[tuple[int, int, int, int]] = set()
    with warnings.catch_warnings():  # TVM warns about every initializer that is not a graph input
        warnings.simplefilter("ignore", UserWarning)
        with step("build: import to TVM Relax", progress):
            mod = importer.import_onnx(model, static, isa=isa, gemms=gemms, conv_layout=conv_layout, weights=weights)
        if tune and gemms:
            cache = tile_cache if tile_cache is not None else tuning.TileCache()
            tiles = _tuned_tiles(gemms, tvm_target, isa, cache, remote)
            mod = importer.import_onnx(model, static, isa=isa, tiles=tiles, conv_layout=conv_layout, weights=weights)
    unscheduled = metaschedule.tunable_functions(mod) if trials else {}  # our kernels, before their schedules
    with step("build: schedule and legalize", False):  # recorded only: the kernels' bar is the progress
        mod = schedules.schedule_module(mod, use_avx2=isa != "generic", progress=progress)
        with tvm_target:  # TVM's own ops legalized and fused here, so their kernels can be scheduled too
            mod = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(tvm_target) + cpu_generic.legalize_passes(tvm_target)
            )(mod)
            if trials:
                unscheduled = {**metaschedule.tunable_functions(mod), **unscheduled}
            mod = schedules.schedule_legalized(mod)
    with tvm_target:
        if trials:
            mod = metaschedule.tune_module(
                mod, unscheduled, tvm_target, trials, tracker=remote.tracker if remote is not None else None
            )
        with step(f"build: generate code ({len(mod.functions)} functions, LLVM)", progress):
            executable = tvm.compile(mod, target=tvm_target)
    names = [i.name for i in model.graph.input]
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input]
    logger.info("built %d functions for %s (int8 dot: %s)", len(mod.functions), tvm_target, isa)
    return TVMModule(executable, names, dtypes, remote)


def _tuned_tiles(
    gemms: set[tuple[int, int, int, int]],
    target: tvm.target.Target,
    isa: str,
    cache: tuning.TileCache,
    remote: Device | None = None,
) -> dict[tuple[int, int, int], tuning.Tile]:
    """The tile of every GEMM shape: from the cache, or searched now and cached. Shapes on the int16 pair kernel
    (AVX2 with a -128 weight) keep the default."""
    tiles = {}
    for m, n, k, kb in sorted(gemms):
        if kb != 4:
            continue
        key = tuning.gemm_key(target, isa, m, n, k, kb)
        tile = cache.get(key)
        if tile is None:
            tile, seconds = tuning.tune_gemm(m, n, k, target, isa, remote)
            cache.put(key, tile, seconds)
        tiles[(m, n, k)] = tile
    return tiles
