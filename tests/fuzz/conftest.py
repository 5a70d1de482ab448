"""Hypothesis profiles for the fuzz suite: `ci` (the default: bounded, part of every test run) and `long` (for a
soak before a release: HYPOTHESIS_PROFILE=long bash scripts/test.sh tests/fuzz; see docs/security.md)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
