"""Progress on the steps a user waits for, one line each on stderr (tqdm), off with ``progress=False``.

:func:`step` marks one step (the torch export, the QDQ insertion, each stage of the TVM build) and shows its time
when it ends; :func:`each` shows a bar over an iterable (calibration batches, the kernels being scheduled).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: the stages of the :func:`recording` block running in this context (None: nothing records)
_STAGES: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("stages", default=None)


def memory_mb() -> tuple[float | None, float | None]:
    """This process's resident memory now and its peak since it started, in MiB (Linux ``/proc``; else None)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def mib(name: str) -> float | None:
        value = fields.get(name, "").split()
        return int(value[0]) / 1024 if value else None

    return mib("VmRSS"), mib("VmHWM")


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, Any]]]:
    """Collect every :func:`step` run inside the block: its label, seconds, resident memory at its end and the
    process's peak resident memory up to its end (``rss_mb``, ``peak_rss_mb``; the step that raises the peak is
    the one that set it). ``compile`` puts the list in ``report["stages"]``."""
    stages: list[dict[str, Any]] = []
    token = _STAGES.set(stages)
    try:
        yield stages
    finally:
        _STAGES.reset(token)


@contextlib.contextmanager
def step(label: str, enabled: bool) -> Iterator[None]:
    """One line for a step: ``label`` while it runs, then its time (and a stage of the :func:`recording` block)."""
    line = tqdm(total=1, desc=label, bar_format="{desc}: {elapsed}", disable=not enabled, leave=True)
    start = time.perf_counter()
    try:
        yield
        line.update(1)
    finally:
        line.close()
        stages = _STAGES.get()
        if stages is not None:
            rss, peak = memory_mb()
            stages.append({"stage": label, "seconds": time.perf_counter() - start, "rss_mb": rss, "peak_rss_mb": peak})


def each(items: Iterable[T], label: str, enabled: bool, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """``items`` with a bar labelled ``label``."""
    yield from tqdm(items, desc=label, unit=unit, total=total, disable=not enabled, leave=True)
