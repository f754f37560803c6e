"""qcompiler: quantize neural networks and compile them to integer-only code.

>>> compiled = qcompiler.compile("model.onnx", target="llvm", calibration=batches)
>>> logits = compiled(x)
"""

from __future__ import annotations

from qcompiler import dialect as dialect  # registers the qcompiler ONNX schemas
from qcompiler.api import CompiledModel, compile, load, simulate
from qcompiler.errors import (
    CalibrationError,
    ModelLoadError,
    PassFailedError,
    QCompilerError,
    RecipeError,
    TargetError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CompiledModel",
    "ModelLoadError",
    "PassFailedError",
    "QCompilerError",
    "RecipeError",
    "TargetError",
    "UnsupportedOpError",
    "compile",
    "load",
    "simulate",
]
