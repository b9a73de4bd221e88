"""Pytest plugin: store fixtures on a real SQLite file and, when configured, real PostgreSQL.

``db_url`` is parametrised over ``sqlite`` (a file in ``tmp_path``) and ``postgres`` (marked
``postgres``; skipped unless ``PROSPECT_MAILER_TEST_POSTGRES_URL`` is set, e.g.
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``). Each PostgreSQL test gets a database
of its own, created from that URL's server and dropped afterwards, so the URL is
self-contained: anything given it (a second Store, a CLI subprocess) sees the same data.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from prospect_mailer.store import Store, sqlite_url

POSTGRES_ENV = "PROSPECT_MAILER_TEST_POSTGRES_URL"

OpenStore = Callable[[], Awaitable[Store]]


async def index_names(conn: AsyncConnection, table: str) -> set[str]:
    """The names of ``table``'s indexes, from the catalogue (SQLAlchemy's reflection skips an
    index on an expression, with a warning)."""
    if conn.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t"
    else:
        query = "SELECT indexname FROM pg_indexes WHERE tablename = :t"
    return {str(n) for (n,) in await conn.execute(text(query), {"t": table})}


def behind_the_stores_back(path: Path, statement: str) -> None:
    """Run ``statement`` on the SQLite file at ``path`` as another process would (to break
    the store under a test)."""
    con = sqlite3.connect(path)
    try:
        con.execute(statement)
        con.commit()
    finally:
        con.close()


def postgres_base_url() -> str | None:
    """The configured PostgreSQL test URL, or ``None``."""
    return os.environ.get(POSTGRES_ENV) or None


def _admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL to an empty database of its own: SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "store.db")
        return
    async with fresh_postgres_database() as url:
        yield url


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """Create an empty PostgreSQL database, yield its URL, then drop it (skips if unset)."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(f"{POSTGRES_ENV} is not set: PostgreSQL tests skipped")
    name = f"pm_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(_admin_dsn(base), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(base).set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database only (for PostgreSQL-specific tests; mark them postgres)."""
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """An opened :class:`Store` on ``db_url``, closed after the test."""
    async with Store.connect(db_url) as opened:
        yield opened


@pytest.fixture
def db(store: Store) -> Store:
    """:func:`store` under the name the send-path tests use (mailer, relay, web, inbound)."""
    return store


@pytest.fixture
async def open_store(db_url: str) -> AsyncIterator[OpenStore]:
    """Open more independent Store objects (own engine: like another process) on ``db_url``."""
    opened: list[Store] = []

    async def _open() -> Store:
        s = await Store.open(db_url)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        await s.close()
