"""TVM backend: integer ONNX -> Relax -> scheduled integer kernels -> LLVM code for the CPU."""

from __future__ import annotations

from qcompiler.backends.tvm.build import TVMModule, build, resolve_target

__all__ = ["TVMModule", "build", "resolve_target"]
