"""The IR layer: frontends, graph queries and the verifier, all on ``onnx_ir``."""

from __future__ import annotations

from qcompiler.ir.frontends import load
from qcompiler.ir.verifier import verify

__all__ = ["load", "verify"]
