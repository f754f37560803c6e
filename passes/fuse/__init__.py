"""Kernel fusion: integer product + bias + requantize (+ clamp) -> one fused op = one kernel."""

from __future__ import annotations

from qcompiler.passes.fuse.integer_linear import FuseIntegerLinearPass

__all__ = ["FuseIntegerLinearPass"]
