"""Range observers for static activation quantization (streaming: constant memory per tensor).

Only finite values count: an additive attention mask carries -inf (and a fully masked row NaN) inside the
softmax group, which is not a range any quantized tensor has to cover.
"""

from __future__ import annotations

import abc

import numpy as np


class Observer(abc.ABC):
    """Accumulates statistics of one tensor over calibration batches and returns a clipping range."""

    @abc.abstractmethod
    def update(self, values: np.ndarray) -> None: ...

    @abc.abstractmethod
    def absmax(self) -> float:
        """The symmetric clipping threshold chosen from what was observed."""


def _finite(values: np.ndarray) -> np.ndarray:
    """``values`` without infinities and NaNs (no copy when there are none)."""
    if values.dtype.kind != "f":
        return values
    finite = np.isfinite(values)
    return values if finite.all() else values[finite]


class MinMaxObserver(Observer):
    """Running min and max; the threshold is ``max(|min|, |max|)``."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf

    def update(self, values: np.ndarray) -> None:
        values = _finite(values)
        if values.size:
            self.low = min(self.low, float(np.min(values)))
            self.high = max(self.high, float(np.max(values)))

    def absmax(self) -> float:
        if not np.isfinite(self.low):
            return 0.0
        return max(abs(self.low), abs(self.high))


class PercentileObserver(Observer):
    """Histogram of ``|x|`` whose range doubles (merging bin pairs) as larger values arrive.

    The threshold is the given percentile of ``|x|``; memory is ``bins`` counters whatever the data size.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.percentile = percentile
        self.counts = np.zeros(bins, dtype=np.int64)
        self.upper = 0.0
        self.maximum = 0.0

    def update(self, values: np.ndarray) -> None:
        magnitudes = np.abs(_finite(values).astype(np.float64, copy=False)).reshape(-1)
        if not magnitudes.size:
            return
        batch_max = float(magnitudes.max())
        self.maximum = max(self.maximum, batch_max)
        if self.upper == 0.0:
            self.upper = batch_max if batch_max > 0 else 1.0
        while batch_max > self.upper:
            half = self.counts.size // 2
            merged = self.counts.reshape(half, 2).sum(axis=1)
            self.counts = np.concatenate([merged, np.zeros(half, dtype=np.int64)])
            self.upper *= 2.0
        hist, _ = np.histogram(magnitudes, bins=self.counts.size, range=(0.0, self.upper))
        self.counts += hist

    def absmax(self) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        if self.percentile >= 100.0:
            return self.maximum
        cumulative = np.cumsum(self.counts)
        index = int(np.searchsorted(cumulative, total * self.percentile / 100.0))
        edge = (index + 1) * self.upper / self.counts.size
        return min(edge, self.maximum)


class MSEObserver(PercentileObserver):
    """The threshold that minimises the expected squared error of symmetric int8 quantization.

    Over the streamed histogram of ``|x|`` (bin centres ``c`` with counts ``n``), for each candidate threshold T
    (every bin edge): ``E(T) = sum_{c <= T} n (T/127)^2 / 12 + sum_{c > T} n (c - T)^2`` (rounding noise inside
    the range, clipping error outside); returns the minimising T.
    """

    def __init__(self, bins: int = 2048, levels: int = 127) -> None:
        super().__init__(percentile=100.0, bins=bins)
        self.levels = levels

    def absmax(self) -> float:
        if int(self.counts.sum()) == 0:
            return 0.0
        width = self.upper / self.counts.size
        centres = (np.arange(self.counts.size) + 0.5) * width
        thresholds = (np.arange(self.counts.size) + 1) * width
        counts = self.counts.astype(np.float64)
        inside = centres[None, :] <= thresholds[:, None]
        rounding = (thresholds / self.levels) ** 2 / 12.0
        clipping = np.clip(centres[None, :] - thresholds[:, None], 0.0, None) ** 2
        errors = np.where(inside, rounding[:, None], clipping) @ counts
        return float(min(thresholds[int(np.argmin(errors))], self.maximum))


def make_observer(kind: str, percentile: float = 99.99) -> Observer:
    """Observer factory by name (``minmax``, ``percentile`` or ``mse``)."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    if kind == "mse":
        return MSEObserver()
    raise ValueError(f"observer: unknown kind {kind!r}; choose 'minmax', 'percentile' or 'mse'")
