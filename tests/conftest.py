"""Shared test configuration. Fixtures live in plugin modules owned by each concern."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["smtp_fixtures", "store_fixtures", "relay_fixtures", "test_web_support"]

# Fast profile for local work, thorough profile for CI (HYPOTHESIS_PROFILE=ci in .ci/run).
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
