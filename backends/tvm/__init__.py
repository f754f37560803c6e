"""TVM backend: integer ONNX -> Relax -> scheduled integer kernels -> LLVM code for the CPU.

In a process that loaded TVM runtime-only (``TVM_USE_RUNTIME_LIB=1``: saved models run, nothing compiles) only the
runtime half is here (runtime.py, params.py): the compiler's Python API cannot load without its library.
"""

from __future__ import annotations

import tvm.base

from qcompiler.backends.tvm.runtime import TVMModule

if not tvm.base._RUNTIME_ONLY:
    from qcompiler.backends.tvm.build import build, int8_dot_isa, resolve_target

__all__ = ["TVMModule", "build", "int8_dot_isa", "resolve_target"]
