"""Shared fixtures. Hypothesis profiles, chosen with HYPOTHESIS_PROFILE:

- 'ci' (default): a fixed seed, so every run of `make test` draws the same graphs and a failure replays;
- 'dev': fewer examples;
- 'explore': new graphs every run (what `make fuzz` does at scale); a failure it finds becomes an @example.
"""

from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=10)
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
warnings.filterwarnings("ignore", category=UserWarning, module="tvm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module whose tests share a module-scoped fixture (a compiled model) runs on one xdist worker (``make test``
    runs ``--dist loadgroup``): spread over two, each worker built the fixture again (SmolLM2's cached compile
    twice: 4 minutes of the suite's 45)."""
    if not config.pluginmanager.hasplugin("xdist"):  # its marker is registered by xdist
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        definitions = info.name2fixturedefs.values() if info is not None else []
        if any(defs and defs[-1].scope == "module" for defs in definitions):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
