"""``python -m qcompiler``: the ``qcompiler`` command (:mod:`qcompiler.cli`)."""

from __future__ import annotations

import sys

from qcompiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
