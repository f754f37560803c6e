"""Shared fixtures. Hypothesis profiles, chosen with HYPOTHESIS_PROFILE:

- 'ci' (default): a fixed seed, so every run of `make test` draws the same graphs and a failure replays;
- 'dev': fewer examples;
- 'explore': new graphs every run (what `make fuzz` does at scale); a failure it finds becomes an @example.
"""

from __future__ import annotations

import os
import warnings

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
