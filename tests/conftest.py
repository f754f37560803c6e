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
    """Modules with a slow test run first, each module's tests in their order: with xdist's work stealing (make
    test: ``--dist worksteal``) the long tests start early and a worker that runs out takes half of the other's
    queue, instead of one worker finishing a 4-minute test alone while the other idles (make test with plain
    ``-n 2``: 56 CPU-minutes took 43)."""
    slow = {item.nodeid.split("::", 1)[0] for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in slow)  # stable: the order within stays
