"""Quantization: observers, weight quantizers and the QDQ insertion pass."""

from __future__ import annotations

from qcompiler.observers import (
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qcompiler.passes.quantize.qdq import QuantizeQDQPass

__all__ = ["MSEObserver", "MinMaxObserver", "Observer", "PercentileObserver", "QuantizeQDQPass", "make_observer"]
