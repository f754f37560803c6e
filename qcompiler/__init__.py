"""qcompiler: quantize neural networks and compile them to integer-only code.

>>> compiled = qcompiler.compile("model.onnx", target="llvm", calibration=batches)
>>> logits = compiled(x)
"""

from __future__ import annotations

from qcompiler import dialect as dialect  # registers the qcompiler ONNX schemas
from qcompiler.api import CompiledModel, compile, load, simulate
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
from qcompiler.generation import CausalLM, compile_causal_lm

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
