"""Helpers shared by the operations commands: settings, the store, JSON and dates."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console

from ..config import Settings, load_settings
from ..store import Store

__all__ = ["echo_json", "err_console", "open_store", "parse_when", "settings"]

#: Progress bars and notes go to stderr, so that stdout stays clean for ``--json`` and exports.
err_console = Console(stderr=True, highlight=False)


def settings() -> Settings:
    """The settings from the environment / ``prospect-mailer.toml`` (ConfigError: exit 2)."""
    return load_settings()


@asynccontextmanager
async def open_store() -> AsyncIterator[Store]:
    """The configured store, closed on exit (``PROSPECT_MAILER_DATABASE_URL``)."""
    async with Store.connect(settings().database_url) as store:
        yield store


def echo_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str, indent=2) + "\n")


def parse_when(value: str | None, option: str) -> datetime | None:
    """``2026-01-31`` or an ISO 8601 time (naive means UTC); a bad value is a usage error."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD) or ISO 8601 time", param_hint=option
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
