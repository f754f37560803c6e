"""Errors of the public interface. Each names the node, argument or file at fault and says what to do."""

from __future__ import annotations


class QCompilerError(Exception):
    """Base class of every error qcompiler raises on purpose."""


class ModelLoadError(QCompilerError, ValueError):
    """A model could not be read or captured."""


class UnsupportedOpError(QCompilerError, NotImplementedError):
    """A node the integer path cannot handle (names the node and its op)."""

    def __init__(self, node_name: str, op_type: str, reason: str) -> None:
        self.node_name = node_name
        self.op_type = op_type
        super().__init__(f"node {node_name!r} (op {op_type}): {reason}")


class CalibrationError(QCompilerError, ValueError):
    """Calibration data missing, of the wrong shape or dtype."""


class RecipeError(QCompilerError, ValueError):
    """Unknown recipe or malformed recipe file."""


class TargetError(QCompilerError, ValueError):
    """Unknown or unsupported compilation target."""


class ContextFullError(QCompilerError, ValueError):
    """A causal LM's cache holds ``max_context`` tokens: a longer sequence needs a model compiled with more."""


class VerificationError(QCompilerError, RuntimeError):
    """The IR is structurally invalid."""


class PassFailedError(QCompilerError, RuntimeError):
    """A pass raised, or left the graph invalid, or changed its outputs beyond tolerance."""

    def __init__(self, pass_name: str, reason: str) -> None:
        self.pass_name = pass_name
        super().__init__(f"pass {pass_name} broke the graph: {reason}")
