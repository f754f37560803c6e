"""Shared fixtures. Hypothesis profiles: 'ci' (default: a fixed seed, so a quick-run failure replays) and 'dev' (fewer
examples, HYPOTHESIS_PROFILE=dev). The slow property tests set derandomize=False: new graphs every slow run."""

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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
warnings.filterwarnings("ignore", category=UserWarning, module="tvm")
