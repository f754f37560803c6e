"""``python -m qcompiler``: the ``qcompiler`` command (:mod:`qcompiler.cli`)."""

from __future__ import annotations

from qcompiler.cli import entry

if __name__ == "__main__":
    entry()
