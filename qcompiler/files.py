"""Outputs written all or nothing: a directory or file appears complete under its name, or not at all.

A writer stages its output next to the target (same file system) under a hidden name carrying its process id and
renames it into place when done. A writer killed mid-way (a signal, a crash, a full disk) leaves only that hidden
staging entry; the next writer of the same target sweeps the leftovers of dead processes (:func:`recover`). The one
window with two renames, replacing an existing directory, parks the old one under a hidden name first: if the
writer dies between the renames, :func:`recover` puts the old directory back."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

_STAGING = "staging"
_PARKED = "old"

#: the files of a saved model (CompiledModel.save, CausalLM.save)
LIBRARY_FILE = "model.so"
OPENCL_FILE = "model.opencl.npz"  # target "opencl": OpenCL C, launch plans and constants (run through pyopencl)
INTEGER_FILE = "integer.onnx"
QDQ_FILE = "qdq.onnx"
REPORT_FILE = "report.json"


def _hidden(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _leftovers(target: Path) -> list[tuple[Path, str, int]]:
    """Hidden staging or parked entries of ``target`` with the kind and the process id that wrote them."""
    found: list[tuple[Path, str, int]] = []
    if not target.parent.is_dir():
        return found
    prefix = f".{target.name}."
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        kind, _, rest = entry.name[len(prefix) :].partition("-")
        pid = rest.partition("-")[0]
        if kind in (_STAGING, _PARKED) and pid.isdigit():
            found.append((entry, kind, int(pid)))
    return found


def recover(target: str | Path) -> None:
    """Clean up after writers of ``target`` that died: their staging entries are removed, and a directory one of
    them had parked while replacing it goes back under its name if nothing took its place."""
    target = Path(target)
    for entry, kind, pid in _leftovers(target):
        if _alive(pid) and pid != os.getpid():
            continue  # another process is writing it now
        if kind == _PARKED and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on a clean exit it replaces ``target`` whole, on an error it is removed.

    Raises:
        FileExistsError: ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    recover(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"directory: {target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_hidden(target, _STAGING), dir=target.parent))
    try:
        yield staging
        if target.exists():
            parked = target.parent / f"{_hidden(target, _PARKED)}{uuid.uuid4().hex[:8]}"
            os.replace(target, parked)
            os.replace(staging, target)
            shutil.rmtree(parked, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a staging file renamed into place: never a half-written file."""
    path = Path(path)
    recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=_hidden(path, _STAGING), dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path
