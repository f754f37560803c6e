"""Progress on the steps a user waits for, one line each on stderr (tqdm), off with ``progress=False``.

:func:`step` marks one step (the torch export, the QDQ insertion, each stage of the TVM build) and shows its time
when it ends; :func:`each` shows a bar over an iterable (calibration batches, the kernels being scheduled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


@contextlib.contextmanager
def step(label: str, enabled: bool) -> Iterator[None]:
    """One line for a step: ``label`` while it runs, then its time."""
    line = tqdm(total=1, desc=label, bar_format="{desc}: {elapsed}", disable=not enabled, leave=True)
    try:
        yield
        line.update(1)
    finally:
        line.close()


def each(items: Iterable[T], label: str, enabled: bool, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """``items`` with a bar labelled ``label``."""
    yield from tqdm(items, desc=label, unit=unit, total=total, disable=not enabled, leave=True)
