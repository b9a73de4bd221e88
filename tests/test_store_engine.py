"""Store opening, URLs, SQLite settings, schema versioning and error translation."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from store_fixtures import index_names

from prospect_mailer.addresses import normalise
from prospect_mailer.errors import ConfigError, StoreError
from prospect_mailer.models import Prospect
from prospect_mailer.store import CURRENT_SCHEMA_VERSION, Store, core, parse_url, sqlite_url
from prospect_mailer.store.engine import translate_errors

EXPECTED_TABLES = {
    "schema_version",
    "suppression",
    "audit_head",
    "audit_events",
    "send_claims",
    "prospects",
}


async def _tables(store: Store) -> set[str]:
    async with store.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def _version(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text("SELECT version FROM schema_version"))).scalar_one())


async def test_open_creates_schema_once(db_url: str) -> None:
    async with Store.connect(db_url) as store:
        assert await _tables(store) >= EXPECTED_TABLES
        assert await _version(store) == CURRENT_SCHEMA_VERSION
        assert await store.suppression.add_address(
            "a@example.com", scope_value="acme", reason="manual", source="cli"
        )
    # Reopening keeps data and does not duplicate the version or head rows.
    async with Store.connect(db_url) as store:
        assert await store.suppression.count() == 1
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM schema_version"))).scalar() == 1
            assert (await conn.execute(text("SELECT count(*) FROM audit_head"))).scalar() == 1


async def test_concurrent_opens_create_schema_safely(db_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(db_url) for _ in range(6)))
    try:
        assert [await _version(s) for s in stores] == [CURRENT_SCHEMA_VERSION] * 6
    finally:
        for s in stores:
            await s.close()


async def test_context_manager_forms_and_closed_store(db_url: str) -> None:
    async with await Store.open(db_url) as store:
        assert not store.closed
        assert store.dialect in ("sqlite", "postgresql")
        assert "open" in repr(store)
    assert store.closed
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.suppression.lookup(["0" * 64])


async def test_newer_schema_version_is_refused(db_url: str) -> None:
    async with Store.connect(db_url) as store, store.engine.begin() as conn:
        await conn.execute(text("UPDATE schema_version SET version = 99"))
    with pytest.raises(StoreError, match=r"schema version 99, newer"):
        await Store.open(db_url)


async def _indexes(store: Store) -> set[str]:
    async with store.engine.connect() as conn:
        return await index_names(conn, "suppression")


#: The suppression lookup index each older schema version had.
_OLD_LOOKUP_INDEX = {
    1: "CREATE INDEX ix_suppression_key_hash ON suppression (key_hash)",
    2: "CREATE INDEX ix_suppression_lookup ON suppression "
    "(key_hash, kind, scope, scope_value, reason, source, created_at)",
}


async def _make_old_version(db_url: str, version: int = 1, *, sabotage: bool = False) -> None:
    """Turn a new database back into what a prospect-mailer with schema ``version`` wrote.

    ``sabotage``: also give another table an index of the name the migration creates, so
    that the migration fails.
    """
    async with Store.connect(db_url) as store:
        await store.suppression.add_address(
            "ann@example.com", scope_value="acme", reason="unsubscribe", source="web"
        )
        async with store.engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_suppression_prefix"))
            await conn.execute(text(_OLD_LOOKUP_INDEX[version]))
            await conn.execute(text(f"UPDATE schema_version SET version = {version}"))
            if sabotage:
                await conn.execute(text("CREATE INDEX ix_suppression_prefix ON prospects (id)"))


@pytest.mark.parametrize("old", [1, 2])
async def test_older_schemas_are_migrated_to_the_prefix_lookup_index(
    db_url: str, old: int, caplog: pytest.LogCaptureFixture
) -> None:
    await _make_old_version(db_url, old)
    # Several processes opening the old database at once: one migrates, the others wait.
    stores = await asyncio.gather(*(Store.open(db_url) for _ in range(4)))
    try:
        assert [await _version(s) for s in stores] == [CURRENT_SCHEMA_VERSION] * 4
        indexes = await _indexes(stores[0])
        assert "ix_suppression_key_hash" not in indexes
        assert "ix_suppression_lookup" not in indexes
        assert "ix_suppression_prefix" in indexes
        key = normalise("ann@example.com").key_hash
        # An entry written after the migration is found through the new index too.
        await stores[1].suppression.add_address(
            "bob@example.com", scope_value="acme", reason="manual", source="cli"
        )
        bob = normalise("bob@example.com").key_hash
        for s in stores:
            found = await s.suppression.lookup([key, bob, "0" * 64])
            assert sorted(found) == sorted([key, bob])
            (hit,) = found[key]
            assert (hit.scope, hit.scope_value, hit.reason) == ("advertiser", "acme", "unsubscribe")
    finally:
        for s in stores:
            await s.close()
    steps = [f"from version {v} to {v + 1}" for v in range(old, CURRENT_SCHEMA_VERSION)]
    for step in steps:
        assert sum(step in r.getMessage() for r in caplog.records) == 1, step


async def test_open_waits_for_another_process_upgrading_the_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration holds the write lock longer than the 10 s busy timeout (about 30 s per 10M
    suppression entries): a relay worker or a script opening the store meanwhile waits for it
    instead of failing, and gives up only after SCHEMA_LOCK_WAIT."""
    url = sqlite_url(tmp_path / "store.db")
    await _make_old_version(url)
    upgrading = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    upgrading.execute("BEGIN IMMEDIATE")  # as a long migration in another process would
    opening = asyncio.ensure_future(Store.open(url))
    await asyncio.sleep(1.0)  # five times the busy timeout the wait uses per attempt
    assert not opening.done()
    upgrading.execute("COMMIT")
    store = await asyncio.wait_for(opening, 10)
    try:
        assert await _version(store) == CURRENT_SCHEMA_VERSION
    finally:
        await store.close()
    assert any("waiting for the store's write lock" in r.getMessage() for r in caplog.records)

    await _make_old_version(url)
    monkeypatch.setattr(core, "SCHEMA_LOCK_WAIT", 0.5)
    upgrading.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(StoreError, match="database is locked"):
        await Store.open(url)
    assert time.monotonic() - started < 5
    upgrading.execute("ROLLBACK")
    upgrading.close()


async def test_a_failed_migration_leaves_the_old_version(db_url: str) -> None:
    """The migration and the version update are one transaction."""
    await _make_old_version(db_url, sabotage=True)
    with pytest.raises(StoreError, match="opening the store"):
        await Store.open(db_url)
    # Still version 1 with its old index: a fixed database migrates on the next open.
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            version = (await conn.execute(text("SELECT version FROM schema_version"))).scalar()
            names = await index_names(conn, "suppression")
    finally:
        await engine.dispose()
    assert version == 1
    assert "ix_suppression_key_hash" in names


async def test_bare_path_and_pathlike_open_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "bare.db"
    async with Store.connect(str(path)) as store:
        assert store.dialect == "sqlite"
        await store.suppression.add_domain(
            "example.com", scope="global", scope_value="", reason="manual", source="cli"
        )
    assert path.exists()
    async with Store.connect(path) as store:
        assert await store.suppression.count() == 1


def test_url_helpers(tmp_path: Path) -> None:
    assert sqlite_url(tmp_path / "x.db") == f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    assert sqlite_url("rel.db").endswith(os.path.join(os.getcwd(), "rel.db"))
    assert parse_url("sqlite:///a.db").drivername == "sqlite+aiosqlite"
    assert parse_url("postgres://u@h/db").drivername == "postgresql+asyncpg"
    assert parse_url("postgresql://u@h:5433/db").port == 5433
    for bad in ("mysql://u@h/db", "postgresql+psycopg://u@h/db", "   "):
        with pytest.raises(ConfigError):
            parse_url(bad)


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    async with Store.connect(tmp_path / "p.db") as store, store.engine.connect() as conn:

        async def pragma(name: str) -> object:
            return (await conn.execute(text(f"PRAGMA {name}"))).scalar()

        assert await pragma("journal_mode") == "wal"
        assert await pragma("synchronous") == 2  # FULL
        assert await pragma("busy_timeout") == 10000
        assert await pragma("foreign_keys") == 1


async def test_schema_option_is_refused_for_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL"):
        await Store.open(tmp_path / "s.db", schema="x")


async def test_unreachable_postgres_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(StoreError, match="opening the store") as info:
        await Store.open("postgresql+asyncpg://postgres@127.0.0.1:1/test", connect_timeout=5)
    assert time.monotonic() - started < 6
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("kind", ["directory", "missing_parent", "not_a_database"])
async def test_unusable_sqlite_file_raises_store_error(tmp_path: Path, kind: str) -> None:
    if kind == "directory":
        target = tmp_path
    elif kind == "missing_parent":
        target = tmp_path / "no" / "such" / "dir" / "x.db"
    else:
        target = tmp_path / "junk.db"
        target.write_bytes(b"this is not an SQLite database at all" * 200)
    with pytest.raises(StoreError):
        await Store.open(target)


async def test_failures_after_open_raise_store_error(db_url: str) -> None:
    async with Store.connect(db_url) as store:
        async with store.engine.begin() as conn:
            for table in ("suppression", "audit_head", "send_claims", "prospects"):
                await conn.execute(text(f"DROP TABLE {table}"))
        with pytest.raises(StoreError, match="suppression lookup failed") as info:
            await store.suppression.lookup(["a" * 64])
        # the driver's error is kept as the cause (SQLite lookups bypass SQLAlchemy)
        assert isinstance(info.value.__cause__, SQLAlchemyError | sqlite3.Error)
        with pytest.raises(StoreError):
            await store.suppression.add_address(
                "a@example.com", scope_value="acme", reason="manual", source="cli"
            )
        with pytest.raises(StoreError):
            await store.audit.verify()
        with pytest.raises(StoreError):
            await store.claims.claim(
                campaign_id="c", step=1, recipient_hash="a" * 64, advertiser_id="x", send_id="s"
            )
        # The message names what failed, never the statement's parameters (they hold PII).
        with pytest.raises(StoreError, match="registering prospects") as info:
            await store.prospects.upsert(Prospect(email="secret.person@example.com"))
        assert "secret.person" not in str(info.value)


def test_translate_errors_maps_os_errors_and_keeps_ours() -> None:
    with (
        pytest.raises(StoreError, match=r"reading x failed: ConnectionRefusedError") as info,
        translate_errors("reading x"),
    ):
        raise ConnectionRefusedError("refused")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    original = StoreError("mine")
    with pytest.raises(StoreError) as again, translate_errors("y"):
        raise original
    assert again.value is original
    with pytest.raises(KeyError), translate_errors("z"):
        raise KeyError("not a store error")


@pytest.mark.postgres
async def test_postgres_schema_option(postgres_url: str) -> None:
    db_url = postgres_url
    async with Store.connect(db_url) as store, store.engine.begin() as conn:
        await conn.execute(text("CREATE SCHEMA tenant_a"))
    async with Store.connect(db_url, schema="tenant_a") as tenant:
        await tenant.suppression.add_address(
            "a@example.com", scope_value="acme", reason="manual", source="cli"
        )
        async with tenant.engine.connect() as conn:
            sql = "SELECT table_schema FROM information_schema.tables WHERE table_name = :t"
            where = await conn.execute(text(sql), {"t": "suppression"})
            assert set(where.scalars()) == {"public", "tenant_a"}
    async with Store.connect(db_url) as store:
        assert await store.suppression.count() == 0  # public schema untouched
    with pytest.raises(ConfigError, match="schema"):
        await Store.open(db_url, schema="bad; DROP")


async def test_read_only_sqlite_database_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    async with Store.connect(path) as store:
        await store.suppression.add_domain(
            "example.com", scope="global", scope_value="", reason="manual", source="cli"
        )
    # Running as root defeats chmod; SQLite's own read-only mode is a reliable stand-in.
    with pytest.raises(StoreError, match="opening the store"):
        await Store.open(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")


async def test_in_memory_store_takes_concurrent_tasks_one_at_a_time() -> None:
    """An in-memory SQLite store is one connection: concurrent tasks used to end each other's
    transactions, so writes reported done were lost (1 of 20 reported, 0 kept). Now every
    write is kept and every read sees only committed rows."""
    async with Store.connect("sqlite+aiosqlite:///:memory:") as store:
        results = await asyncio.gather(
            *(
                store.suppression.add_address(
                    f"a{i}@example.com", scope_value="acme", reason="manual", source="cli"
                )
                for i in range(20)
            ),
            *(store.suppression.count() for _ in range(5)),
        )
        assert results[:20] == [True] * 20
        assert all(isinstance(n, int) and 0 <= n <= 20 for n in results[20:])
        assert await store.suppression.count() == 20
        assert (await store.audit.verify()).ok
