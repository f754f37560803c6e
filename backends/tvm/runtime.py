"""The runtime half of the TVM backend: a built library run on numpy feeds.

Imports TVM's runtime only (``tvm.runtime``, the Relax VM), never the compiler: a process that only runs saved
models (``qcompiler generate``) may load TVM runtime-only (``TVM_USE_RUNTIME_LIB=1``: 80 MB against 400 MB).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
import tvm.runtime.vm

from qcompiler.backends.tvm.params import host_array
from qcompiler.errors import TargetError
from qcompiler.logs import native_stderr_routed

if TYPE_CHECKING:
    from qcompiler.backends.tvm.remote import Device


def _host_view(tensor: Any) -> np.ndarray:
    """A CPU tensor as a numpy array over its memory (DLPack), or a copy where numpy cannot take its type."""
    try:
        return np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError):
        return tensor.numpy()


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
        params: Sequence[Any] = (),
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
        # the weights, when the build lifted them out of the code (params.lift_constants): numpy arrays or TVM
        # tensors, passed after the inputs
        self.params = list(params)
        self._param_tensors: list[Any] | None = None
        self._weight_addresses: frozenset[int] | None = None  # the parameters' memory (run() copies outputs over it)

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
                vm = tvm.runtime.vm.VirtualMachine(self.executable, self.device)
            else:
                code = self.remote.load_file(self._library) if self._library else self.remote.load(self.executable)
                vm = tvm.runtime.vm.VirtualMachine(code, self.remote.tvm_device)
            self._vm_main = (vm, vm["main"])
        return self._vm_main

    def _weights(self) -> list[Any]:
        """The parameters as tensors on the device: TVM tensors as they are (shared by the modules that hold the
        same ones, params.share_params), arrays copied once."""
        if self._param_tensors is None:
            local = self.remote is None and self.device_kind == "cpu"
            self._weight_addresses = None
            self._param_tensors = [
                p
                if local and isinstance(p, tvm.runtime.Tensor)
                else tvm.runtime.tensor(np.ascontiguousarray(host_array(p)), self.device)
                for p in self.params
            ]
        return self._param_tensors

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
        return args + self._weights()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on numpy feeds (not thread-safe: the input staging tensors are reused). Outputs on this machine's CPU
        come back as numpy views of the VM's output tensors (each call allocates its outputs anew; a copy each
        costs 6 us, 0.4 ms of a causal LM's decode step with its 60 cache outputs)."""
        arguments = self._arguments(feeds)
        result = self._loaded()[1](*arguments)
        outputs = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        if self.remote is None and self.device_kind == "cpu":
            # an output over an input's or a weight's memory (a graph returning a reshaped input) is copied: the
            # staging tensors are refilled by the next call
            if self._weight_addresses is None:
                self._weight_addresses = frozenset(w.data_ptr() for w in self._weights())
            held = self._weight_addresses.union(a.data_ptr() for a in arguments[: len(self.input_names)])
            return [r.numpy() if r.data_ptr() in held else _host_view(r) for r in outputs]
        return [r.numpy() for r in outputs]

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
        vm = tvm.runtime.vm.VirtualMachine(self.executable, self.device)
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
        params: Sequence[Any] = (),
    ) -> TVMModule:
        """A library written by :meth:`export`, run here or, with ``remote``, on that device. A CUDA library built
        where no CUDA driver was carries CUDA C: nvcc compiles it now for this machine's GPU."""
        hook: Any = contextlib.nullcontext()
        if device_kind == "cuda":
            from qcompiler.backends.tvm.gpu import nvcc_compiles_cuda

            hook = nvcc_compiles_cuda()
        with native_stderr_routed(), hook:  # and once per memory scope it loads
            module = tvm.runtime.load_module(str(path))
        loaded = cls(module, input_names, input_dtypes, remote, device_kind, params)
        loaded._library = Path(path)
        return loaded

    def llvm_ir(self) -> str:
        """LLVM IR of the host module (the kernels); for the integer-only check."""
        module = self.executable.mod
        parts = [str(module.inspect_source("ll"))]
        parts.extend(str(lib.inspect_source("ll")) for lib in module.imports)
        return "\n".join(parts)
