"""Fixtures shared by the real-model tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def smol():
    """The real SmolLM2-135M (qcompiler.testing.llm), loaded once per test module; skipped where not installed."""
    pytest.importorskip("torch")
    from qcompiler.testing.llm import ModelUnavailableError, load_smollm2

    try:
        return load_smollm2()
    except ModelUnavailableError as missing:
        pytest.skip(str(missing))
