"""TVM backend: integer ONNX -> Relax -> scheduled integer kernels -> LLVM code for the CPU."""

from __future__ import annotations

from qcompiler.backends.tvm.build import TVMModule, build, int8_dot_isa, resolve_target

__all__ = ["TVMModule", "build", "int8_dot_isa", "resolve_target"]
