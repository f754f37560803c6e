"""qcompiler: quantize neural networks and compile them to integer-only code.

>>> compiled = qcompiler.compile("model.onnx", target="llvm", calibration=batches)
>>> logits = compiled(x)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qcompiler import dialect as dialect  # registers the qcompiler ONNX schemas
from qcompiler.errors import (
    CalibrationError,
    ContextFullError,
    ModelLoadError,
    PassFailedError,
    QCompilerError,
    RecipeError,
    TargetError,
    UnsupportedOpError,
)

if TYPE_CHECKING:
    from qcompiler.api import CompiledModel, compile, load, simulate
    from qcompiler.generation import CausalLM, compile_causal_lm

#: the API's names, each loaded from its module on first use: a process that only runs a saved causal LM
#: (qcompiler generate) then never imports the passes, onnxruntime or onnxscript
_HOMES = {"CompiledModel": "api", "compile": "api", "load": "api", "simulate": "api", "CausalLM": "generation",
          "compile_causal_lm": "generation"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CausalLM",
    "CompiledModel",
    "ContextFullError",
    "ModelLoadError",
    "PassFailedError",
    "QCompilerError",
    "RecipeError",
    "TargetError",
    "UnsupportedOpError",
    "compile",
    "compile_causal_lm",
    "load",
    "simulate",
]
