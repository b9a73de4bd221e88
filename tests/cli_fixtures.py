"""Fixtures for the command-line tests: an isolated working folder and database per test.

``cli_env`` points the CLI at the ``db_url`` database (SQLite file or a fresh PostgreSQL
database) through ``PROSPECT_MAILER_*`` variables, as a user would, works in ``tmp_path`` and
widens the consoles so that tables never wrap an address.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from prospect_mailer.cli.app import console
from prospect_mailer.cli.common import err_console
from prospect_mailer.store import Store

EXAMPLES = Path(__file__).parent.parent / "examples"
T = TypeVar("T")
BASE_URL = "https://optout.acme-capteurs.example"

HEADER = (
    "email,name,recipient_type,legal_basis,source_type,collection_method,collecting_entity,"
    "optout_offered_at_collection,collected_at,job_function,country"
)


def b2b_row(email: str, *, job: str = "CTO", collected: str = "2026-03-12") -> str:
    """A CSV row (HEADER's columns) for a professional the example campaign may mail."""
    return (
        f"{email},P,professional,legitimate_interest,direct,salon,acme-capteurs,yes,"
        f"{collected},{job},FR"
    )


def write_csv(
    path: Path, rows: list[str], *, header: str = HEADER, encoding: str = "utf-8"
) -> Path:
    """Write a prospects CSV."""
    path.write_text("\n".join([header, *rows]) + "\n", encoding)
    return path


def read_report(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV report."""
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class CliEnv:
    """Where a CLI test runs."""

    root: Path
    db_url: str
    outbox: Path
    campaign: Path

    def store_call(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        """Run ``await fn(store)`` on a fresh Store (like another process) and return it."""

        async def run() -> T:
            async with Store.connect(self.db_url) as store:
                return await fn(store)

        return asyncio.run(run())


@pytest.fixture(name="cli_env")
def cli_env_fixture(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliEnv:
    """Environment variables, working folder and console width for one CLI test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROSPECT_MAILER_CONFIG", raising=False)
    monkeypatch.delenv("PROSPECT_MAILER_SMTP_URL", raising=False)
    monkeypatch.setenv("PROSPECT_MAILER_DATABASE_URL", db_url)
    monkeypatch.setenv("PROSPECT_MAILER_SECRET_KEY", "k" * 40)
    monkeypatch.setenv("PROSPECT_MAILER_OUTBOX_DIR", str(tmp_path / "outbox"))
    monkeypatch.setenv("PROSPECT_MAILER_BASE_URL", BASE_URL)
    monkeypatch.setattr(console, "width", 250)
    monkeypatch.setattr(err_console, "width", 250)
    return CliEnv(tmp_path, db_url, tmp_path / "outbox", EXAMPLES / "campaign.toml")
