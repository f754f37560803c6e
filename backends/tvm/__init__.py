"""TVM backend: integer ONNX -> Relax -> scheduled integer kernels -> LLVM code for the CPU."""

from __future__ import annotations

import os

# TVM's thread pool defaults to half the logical CPUs (it assumes two hyper-threads per core), which on these
# 2-vCPU machines means one thread: parallel kernels then only pay the pool's overhead. Use every CPU this
# process may run on unless the user chose (TVM_NUM_THREADS). Read when the pool starts, so set it early.
if "TVM_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )

from qcompiler.backends.tvm.build import TVMModule, build, int8_dot_isa, resolve_target

__all__ = ["TVMModule", "build", "int8_dot_isa", "resolve_target"]
