"""Lowering: QDQ + float ops -> integer ops (standard integer ONNX plus the ``qcompiler`` domain)."""

from __future__ import annotations

from qcompiler.passes.lower.dyadic import LowerQDQToIntegerPass, float_islands, float_ops_inside
from qcompiler.passes.lower.nonlinear import LowerNonlinearitiesPass

__all__ = ["LowerNonlinearitiesPass", "LowerQDQToIntegerPass", "float_islands", "float_ops_inside"]
