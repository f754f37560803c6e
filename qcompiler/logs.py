"""Quiet by default: what the libraries we call say goes through our logging, at DEBUG.

A user of ``qcompiler.compile`` should see our progress and summary, and warnings we emit that say what to do;
not the messages of torch.export or onnxscript's folding, which they cannot act on ("Evaluation failed: cannot
reshape ...", "torchvision is not installed"). Inside :func:`third_party_routed`, those libraries' log records and
Python warnings are re-emitted on the ``qcompiler.third_party`` logger at DEBUG: ``--verbose`` on the command
line, or ``logging.getLogger("qcompiler").setLevel(logging.DEBUG)`` with a handler, shows them. (TVM's native
warning at every build, "Fast mode segfaults ...", is gone at its source: backends/tvm/importer.py ``Gather``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

#: the logger every routed message goes to
ROUTED = logging.getLogger("qcompiler.third_party")

#: the libraries' loggers whose records are routed (each with its children)
THIRD_PARTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx")


def verbose() -> bool:
    """Whether the user asked for our DEBUG log (``--verbose``): then nothing is routed or silenced."""
    return logging.getLogger("qcompiler").isEnabledFor(logging.DEBUG)


class _Reemit(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        ROUTED.debug("%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def _routed_loggers(names: Sequence[str]) -> Iterator[None]:
    """Each logger's handlers replaced by one that re-emits (torch attaches its own stderr handler to
    ``torch.onnx``), and nothing propagated to its parents, for the block."""
    handler = _Reemit(logging.DEBUG)
    saved = []
    for name in names:
        library = logging.getLogger(name)
        saved.append((library, library.propagate, list(library.handlers)))
        library.handlers = [handler]
        library.propagate = False
    try:
        yield
    finally:
        for library, propagate, handlers in saved:
            library.handlers = handlers
            library.propagate = propagate


@contextlib.contextmanager
def _routed_warnings() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                ROUTED.debug("%s: %s", warning.category.__name__, warning.message)


@contextlib.contextmanager
def native_stderr_routed() -> Iterator[None]:
    """What native code writes to file descriptor 2 during the block, re-emitted line by line on :data:`ROUTED`
    at DEBUG (TVM's runtime logs a "Scope Saving:" / "Scope Loaded:" warning per memory scope whenever it saves or
    loads a compiled module: thousands of lines for an LLM). For short calls into native code only: anything
    written to stderr meanwhile, Python's included, is captured too. Nothing is captured when the ``qcompiler``
    logger is at DEBUG."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    ROUTED.debug("native: %s", line)


@contextlib.contextmanager
def third_party_routed() -> Iterator[None]:
    """Route the libraries' log records and warnings to :data:`ROUTED` at DEBUG for the block. With the
    ``qcompiler`` logger at DEBUG nothing is captured: a user debugging sees every message where and when it
    was written. Our own warnings are log records of ``qcompiler.*`` loggers, never routed."""
    if verbose():
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(_routed_loggers(THIRD_PARTY_LOGGERS))
        stack.enter_context(_routed_warnings())
        yield
