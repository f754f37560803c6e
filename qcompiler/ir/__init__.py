"""The IR layer: frontends, graph queries and the verifier, all on ``onnx_ir``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcompiler.ir.frontends import load
    from qcompiler.ir.verifier import verify

#: loaded on first use: the graph helpers (graph.py, ops.py) import without the frontends (torch, onnxscript)
_HOMES = {"load": "frontends", "verify": "verifier"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = ["load", "verify"]
