"""Shared test configuration. Fixtures live in plugin modules owned by each concern."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest
from hypothesis import HealthCheck, settings

from prospect_mailer.relay_workers import event_loop_factory

pytest_plugins = ["smtp_fixtures", "store_fixtures", "relay_fixtures", "test_web_support"]

# Fast profile for local work, thorough profile for CI (HYPOTHESIS_PROFILE=ci in .ci/run).
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: Modules whose tests run the relay or the SMTP transport: they run on asyncio's own event loop
#: and again on uvloop (what ``prospect-mailer relay`` runs on when the ``fast`` extra is
#: installed, ``relay.event_loop = auto``).
_BOTH_LOOPS = {
    "test_relay", "test_relay_security", "test_relay_upstream", "test_relay_units",
    "test_inbound", "test_transport",
}  # fmt: skip


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in _BOTH_LOOPS:
        name, factory = event_loop_factory("auto")
        if name == "uvloop":
            return {"asyncio": asyncio.new_event_loop, "uvloop": factory}
    return {"asyncio": asyncio.new_event_loop}
