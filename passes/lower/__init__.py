"""Lowering: QDQ + float ops -> integer ops (standard integer ONNX plus the ``qcompiler`` domain)."""

from __future__ import annotations

from qcompiler.passes.lower.dyadic import LowerQDQToIntegerPass, float_ops_inside

__all__ = ["LowerQDQToIntegerPass", "float_ops_inside"]
