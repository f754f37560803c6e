"""GPU targets: CUDA (code for NVIDIA GPUs, its PTX checked for floating point here) and OpenCL (run through
pyopencl: OpenCL GPUs, and the executable twin of the CUDA build on machines without a GPU).

The importer, the kernels' compute definitions and the lowering are the CPU backend's (``isa="generic"``: the
plain int8 x int8 -> int32 definitions, no x86 intrinsic); only the schedules differ. Today every kernel gets
TVM's DLight GPU rules (Matmul, GEMV, Reduction, GeneralReduction, then Fallback for the rest), the schedule
layer of TVM's own CUDA pipeline; nvcc turns their int8 dot products into ``dp4a``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import tirx
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import Schedule

from qcompiler.backends.tvm import importer
from qcompiler.backends.tvm.importer import OPAQUE_PATTERN
from qcompiler.backends.tvm.schedules import KERNEL_ATTR, block_names
from qcompiler.errors import TargetError
from qcompiler.progress import step

logger = logging.getLogger(__name__)

#: CUDA architectures the backend builds for (nvcc 13's list from Turing on): what their int8 GEMMs can use.
#: dp4a exists on every one; int8 tensor cores (mma m16n8k32 s8) from sm_80 (sm_75 has m8n8k16 only).
CUDA_ARCHS = {
    "sm_75": "dp4a, int8 mma m8n8k16 (Turing)",
    "sm_80": "dp4a, int8 mma m16n8k32 (Ampere A100)",
    "sm_86": "dp4a, int8 mma m16n8k32 (Ampere RTX 30)",
    "sm_87": "dp4a, int8 mma m16n8k32 (Jetson Orin)",
    "sm_89": "dp4a, int8 mma m16n8k32 (Ada)",
    "sm_90": "dp4a, int8 mma m16n8k32 (Hopper H100/H200)",
    "sm_100": "dp4a, int8 mma m16n8k32 (Blackwell B200)",
    "sm_120": "dp4a, int8 mma m16n8k32 (Blackwell RTX 50)",
}
#: the architecture of ``target="cuda"`` when this machine has no GPU to ask: the oldest with int8 mma m16n8k32
#: (its fatbin carries PTX too, which newer GPUs' drivers compile for themselves)
DEFAULT_CUDA_ARCH = "sm_80"


def nvcc() -> str:
    """The nvcc executable, or a TargetError that says what to install."""
    found = shutil.which("nvcc")
    if found is None and os.environ.get("CUDA_PATH"):
        candidate = Path(os.environ["CUDA_PATH"]) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        raise TargetError(
            "target 'cuda' needs nvcc (the CUDA toolkit) to turn the generated CUDA C into PTX and a fatbin; "
            "install the CUDA toolkit and put nvcc on PATH (or set CUDA_PATH), or use target='opencl' or 'llvm'"
        )
    return found


def local_cuda_arch() -> str | None:
    """``sm_XY`` of this machine's first CUDA GPU, if TVM's runtime sees one."""
    if not tvm.runtime.enabled("cuda"):
        return None
    device = tvm.cuda(0)
    if not device.exist:
        return None
    return "sm_" + str(device.compute_version).replace(".", "")


def cuda_target(spec: str | Mapping[str, Any]) -> tvm.target.Target:
    """The TVM target of ``"cuda"`` (this machine's GPU, else :data:`DEFAULT_CUDA_ARCH`) or of
    ``{"kind": "cuda", "arch": "sm_XY", ...}``, with the LLVM host.

    Raises:
        TargetError: an architecture outside :data:`CUDA_ARCHS`, or no nvcc.
    """
    options = {"kind": "cuda"} if isinstance(spec, str) else dict(spec)
    arch = str(options.get("arch") or local_cuda_arch() or DEFAULT_CUDA_ARCH)
    if arch not in CUDA_ARCHS:
        raise TargetError(
            f"target: CUDA arch {arch!r} is not supported; use one of {sorted(CUDA_ARCHS, key=lambda a: int(a[3:]))}"
        )
    nvcc()
    options["arch"] = arch
    return tvm.target.Target(options, host="llvm")


def opencl_target(spec: str | Mapping[str, Any]) -> tvm.target.Target:
    """The TVM target of ``"opencl"`` (or ``{"kind": "opencl", ...}``), with the LLVM host.

    Raises:
        TargetError: pyopencl missing, or no OpenCL device whose compiler works.
    """
    from qcompiler.backends.tvm import opencl

    opencl.opencl_device()
    return tvm.target.Target({"kind": "opencl"} if isinstance(spec, str) else dict(spec), host="llvm")


#: threads per block of the row-wise kernels: a multiple of every GPU's warp, within OpenCL's usual 256 limit
ROW_THREADS = 256


def schedule_rowwise_gpu(sch: Schedule, threads: int = ROW_THREADS) -> None:
    """Per-row kernels (softmax, LayerNorm/RMSNorm): one thread block per row. The elementwise stages along the
    row are inlined into their readers; each reduction over the row runs across the block's threads (TVM's
    cross-thread reduction, its result in shared memory); the per-row scalar stages (the integer square root's
    Newton steps, reciprocals) are computed by every thread in its registers. DLight's rules would inline those
    scalar stages too, and the Newton steps, each reading the last twice, grow exponentially when inlined.

    Raises:
        tvm.s_tir.schedule.ScheduleError: the kernel is not shaped like that (it keeps DLight's schedule).
    """
    names = block_names(sch)
    out_rank = len(sch.get(sch.get_sblock(names[-1])).iter_vars)
    for name in names[:-1]:  # [rows, columns] intermediates: recomputed where read (a few integer ops each)
        iters = sch.get(sch.get_sblock(name)).iter_vars
        if len(iters) == out_rank and all(int(iv.iter_type) == 0 for iv in iters):
            sch.compute_inline(sch.get_sblock(name))
    names = block_names(sch)
    loops = sch.get_loops(sch.get_sblock(names[-1]))
    if len(loops) < 2:
        raise tvm.s_tir.schedule.ScheduleError("a row-wise kernel needs a row loop and a column loop")
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    _, column = sch.split(loops[-1], [None, threads])
    sch.bind(row, "blockIdx.x")
    sch.bind(column, "threadIdx.x")
    for name in reversed(names[:-1]):  # consumers first: each producer then has its consumer under the row loop
        block = sch.get_sblock(name)
        sch.compute_at(block, row)
        inner = sch.get_loops(block)[1:]
        if inner:  # a reduction along the row
            _, lane = sch.split(inner[-1], [None, threads])
            sch.bind(lane, "threadIdx.x")
            sch.set_scope(block, 0, "shared")
        else:  # a per-row scalar
            sch.set_scope(block, 0, "local")


#: our kernels with a GPU schedule of their own, by kind (the importer's tag); DLight schedules the rest
_GPU_SCHEDULES = {"rowwise": schedule_rowwise_gpu}


def schedule_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Give our tagged kernels that have one their GPU schedule, marked scheduled and opaque (DLight and FuseOps
    then leave them as they are); a kernel its schedule does not fit keeps DLight's."""
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
            continue
        schedule = _GPU_SCHEDULES.get(str(func.attrs[KERNEL_ATTR]))
        if schedule is None:
            continue
        sch = Schedule(tvm.IRModule({"main": func}))
        try:
            schedule(sch)
        except tvm.s_tir.schedule.ScheduleError as failure:
            logger.debug("GPU schedule skipped for %s: %s", gvar.name_hint, failure)
            continue
        attrs = {**dict(func.attrs), "tirx.is_scheduled": True, "op_pattern": OPAQUE_PATTERN}
        mod[gvar] = sch.mod["main"].with_attrs(attrs)
    return mod


def _dlight_rules() -> list[Any]:
    from tvm.s_tir import dlight

    gpu = dlight.gpu

    class Matmul(gpu.Matmul):  # type: ignore[name-defined]
        """DLight's CUDA tiles with scalar shared-memory loads: its 2-wide int8 vector loads print as OpenCL C
        that does not compile (``convert_int2`` of a packed int), and the OpenCL build must run these schedules."""

        def get_configs(self, target: tvm.target.Target) -> Any:
            return dataclasses.replace(super().get_configs(target), vector_size=1)

    return [Matmul(), gpu.GEMV(), gpu.Reduction(), gpu.GeneralReduction(), gpu.Fallback()]


def apply_dlight(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """DLight's GPU rules on every unscheduled kernel, in TVM's order (Matmul, GEMV, Reduction, GeneralReduction,
    Fallback), the first that applies kept. Unlike ``dlight.ApplyDefaultSchedule``, a rule that fails inside
    (DLight's GEMV rule raises "The loop no longer exists" on some fused kernels) passes to the next rule.


    Raises:
        TargetError: no rule schedules a kernel (names it, with the last rule's error).
    """
    rules = _dlight_rules()
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        failure: Exception | None = None
        for rule in rules:
            try:
                space = rule.apply(func, target, False)
            except Exception as error:  # DLight's analyses raise what they meet: ValueError, KeyError, ScheduleError
                failure = error
                logger.debug("DLight %s failed on %s: %s", type(rule).__name__, gvar.name_hint, error)
                continue
            if space is not None:
                scheduled = space[0] if isinstance(space, list) else space
                mod[gvar] = scheduled.mod["main"].with_attr("tirx.is_scheduled", True)
                break
        else:
            raise TargetError(f"kernel {gvar.name_hint}: no GPU schedule applies ({failure})")
    return mod


def schedule_target() -> tvm.target.Target:
    """The one target every GPU build is scheduled for, CUDA and OpenCL alike, so that the OpenCL build runs the
    very schedules the CUDA build compiles (its executable twin): 256 threads and 32 KB of shared memory per block
    at most (what OpenCL devices commonly allow: Oclgrind's local memory is 32 KB), and an arch below sm_70, so
    that DLight's Matmul rule keeps to its tiled int8 path, whose multiply-adds nvcc turns into ``dp4a``. Its
    tensor-core path is not taken: it imports TVM's whole tensor-intrinsic table (75 s on this machine, once per
    process), and an mma or WMMA schedule cannot be checked bit-exact without a device (OpenCL has neither)."""
    return tvm.target.Target(
        {"kind": "cuda", "arch": "sm_61", "max_num_threads": ROW_THREADS, "max_shared_memory_per_block": 32768},
        host="llvm",
    )


def schedule_gpu(mod: tvm.IRModule) -> tvm.IRModule:
    """Our GPU schedules (:data:`_GPU_SCHEDULES`), then TVM's CUDA legalization (its ops legalized and fused, as
    TVM's own CUDA pipeline does) and DLight's rules for every kernel left (:func:`apply_dlight`), all for
    :func:`schedule_target`."""
    from tvm import relax

    target = schedule_target()
    mod = schedule_kernels(mod)
    with target:
        legalize = [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        mod = tvm.transform.Sequential(cuda_pipeline.library_dispatch_passes(target) + legalize)(mod)
        return apply_dlight(mod, target)


def import_for_gpu(
    model: onnx.ModelProto,
    shapes: Mapping[str, list[int]],
    target: tvm.target.Target,
    weights: Mapping[str, np.ndarray] | None,
    progress: bool,
) -> tvm.IRModule:
    with warnings.catch_warnings():  # TVM warns about every initializer that is not a graph input
        warnings.simplefilter("ignore", UserWarning)
        with step("build: import to TVM Relax", progress):
            mod = importer.import_onnx(model, shapes, isa="generic", weights=weights)
    with step("build: GPU schedules", progress):
        return schedule_gpu(mod)


def compile_cuda_source(source: str, arch: str, kind: str) -> bytes:
    """nvcc's ``kind`` (``"ptx"`` or ``"fatbin"``: SASS for ``arch`` plus its PTX) of CUDA C ``source``."""
    flags = {
        "ptx": ["-ptx", f"-arch={arch}"],
        "fatbin": ["-fatbin", f"-gencode=arch=compute_{arch[3:]},code=[{arch},compute_{arch[3:]}]"],
    }[kind]
    with tempfile.TemporaryDirectory(prefix="qcompiler-nvcc-") as work:
        path = Path(work) / "kernels.cu"
        path.write_text(source)
        out = Path(work) / f"kernels.{kind}"
        done = subprocess.run(
            [nvcc(), *flags, "-O3", "-o", str(out), str(path)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise TargetError(f"nvcc failed on the generated CUDA code ({arch}):\n{done.stderr[-4000:]}")
        return out.read_bytes()


@contextlib.contextmanager
def nvcc_compiles_cuda(arch: str | None = None, sources: list[str] | None = None) -> Iterator[None]:
    """Within the block, TVM hands CUDA C to nvcc (a fatbin for ``arch``, default this machine's GPU) through
    its ``tvm_callback_cuda_compile`` hook, and ``sources`` records the source; the previous hook is put back.

    TVM calls the hook where its CUDA runtime loads (a machine with a GPU driver): at build time, and when a
    library built without one, which carries the CUDA C, is loaded. Without the driver the build keeps the source."""
    name = "tvm_callback_cuda_compile"
    previous = tvm.get_global_func(name, allow_missing=True)

    def compile_hook(code: str, *_: Any) -> bytes:
        if sources is not None:
            sources.append(str(code))
        return compile_cuda_source(str(code), arch or local_cuda_arch() or DEFAULT_CUDA_ARCH, "fatbin")

    tvm.register_global_func(name, compile_hook, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm.register_global_func(name, previous, override=True)
        else:
            import tvm_ffi

            tvm_ffi.remove_global_func(name)


def build_gpu(
    model: onnx.ModelProto,
    shapes: Mapping[str, list[int]],
    target: tvm.target.Target,
    weights: Mapping[str, np.ndarray] | None = None,
    progress: bool = False,
) -> Any:
    """Build ``model`` (integer ONNX, static ``shapes``) for a CUDA or OpenCL ``target``: a
    :class:`~qcompiler.backends.tvm.TVMModule` on the CUDA device (with its ``kernels.cu`` and ``kernels.ptx``)
    or an :class:`~qcompiler.backends.tvm.opencl.OpenCLModule`."""
    from qcompiler.backends.tvm import opencl
    from qcompiler.backends.tvm.build import TVMModule

    mod = import_for_gpu(model, shapes, target, weights, progress)
    names = [i.name for i in model.graph.input]
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input]
    if target.kind.name == "opencl":
        with step("build: lower the kernels, OpenCL C", progress):
            plans, source = opencl.lower_kernels(mod, target)
        return opencl.OpenCLModule(opencl.relax_program(mod["main"]), plans, source, names, dtypes)
    arch = str(target.attrs["arch"])
    sources: list[str] = []
    with step(f"build: generate code (CUDA {arch})", progress), target, nvcc_compiles_cuda(arch, sources):
        executable = tvm.compile(mod, target=target)
    # no CUDA driver here: TVM kept the CUDA C in the library (compiled by nvcc where it is loaded)
    source = "\n".join(sources) or "\n".join(str(m.inspect_source()) for m in executable.mod.imports[0].imports)
    with step("build: PTX of the kernels (nvcc)", progress):
        ptx = compile_cuda_source(source, arch, "ptx").decode()
    logger.info("built %d functions for %s", len(mod.functions), target)
    module = TVMModule(executable, names, dtypes, device_kind="cuda")
    module.sources = {"kernels.cu": source, "kernels.ptx": ptx}
    return module
