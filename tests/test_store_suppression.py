"""Suppression list: hashed entries only, idempotent writes, one-query batch lookups."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, inspect
from store_fixtures import OpenStore, index_names

from prospect_mailer.addresses import domain_key, domain_keys_for, normalise
from prospect_mailer.errors import InvalidAddressError, InvalidInputError
from prospect_mailer.models import SuppressionScope
from prospect_mailer.store import Store, SuppressionHit
from prospect_mailer.store.fastread import SQLiteReader


def _hashes(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


@contextmanager
def count_selects(store: Store) -> Iterator[list[str]]:
    """Record the SELECT statements the store runs inside the block."""
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", on_execute)
    reader = store.suppression.reader  # SQLite: lookups bypass SQLAlchemy
    if reader is not None:
        reader.set_trace(lambda statement: on_execute(None, None, statement))
    try:
        yield seen
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", on_execute)
        if reader is not None:
            reader.set_trace(None)


def _unique_constraints(conn: Connection) -> list[Any]:
    # SQLite reads them from its indexes, and SQLAlchemy warns of the expression index it skips.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based")
        return list(inspect(conn).get_unique_constraints("suppression"))


async def test_suppression_table_holds_no_plaintext_pii(store: Store) -> None:
    """CNIL MED-2023-040: only a hash, the scope, the reason, the origin and the time."""
    async with store.engine.connect() as conn:
        columns = await conn.run_sync(lambda c: inspect(c).get_columns("suppression"))
        uniques = await conn.run_sync(_unique_constraints)
        indexes = await index_names(conn, "suppression")
    names = {c["name"] for c in columns}
    assert names == {
        "id", "kind", "key_hash", "scope", "scope_value", "reason", "source", "created_at",
    }  # fmt: skip
    for forbidden in ("email", "address", "name", "birth", "phone", "ip"):
        assert not any(forbidden in n for n in names - {"scope_value"})
    assert [u["column_names"] for u in uniques] == [["kind", "key_hash", "scope", "scope_value"]]
    # Lookups go through the index on the key's first 16 hex digits (schema version 3).
    assert "ix_suppression_prefix" in indexes
    # The address itself is nowhere in the file/rows after a write.
    await store.suppression.add_address(
        "Jane.Doe@Example.com", scope_value="acme", reason="unsubscribe", source="web"
    )
    async with store.engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT * FROM suppression")).all()
    assert "jane" not in repr(rows).lower()


async def test_add_address_is_idempotent_across_spellings(store: Store) -> None:
    s = store.suppression
    opts: dict[str, Any] = {"scope_value": "acme", "reason": "unsubscribe", "source": "one-click"}
    assert await s.add_address("Bob@Example.COM", **opts) is True
    assert await s.add_address("  <bob@example.com> ", **opts) is False
    assert await s.add_address("Bob <BOB@EXAMPLE.com>", **opts) is False
    # Another scope value or scope is another entry.
    assert await s.add_address("bob@example.com", **{**opts, "scope_value": "other"}) is True
    assert await s.add_address(
        "bob@example.com", scope="global", scope_value="", reason="complaint", source="fbl"
    )
    assert await s.count() == 3
    assert await s.count(scope="global") == 1
    hits = await s.lookup([normalise("bob@example.com").key_hash])
    assert {(h.scope, h.scope_value) for h in hits[normalise("bob@example.com").key_hash]} == {
        ("advertiser", "acme"),
        ("advertiser", "other"),
        ("global", ""),
    }


async def test_lookup_returns_address_and_domain_hits_in_one_query(store: Store) -> None:
    s = store.suppression
    await s.add_address(
        "ann@sales.example.com", scope="campaign", scope_value="spring", reason="unsubscribe",
        source="web",
    )  # fmt: skip
    await s.add_domain("Example.COM.", scope_value="acme", reason="manual", source="cli")
    address = normalise("Ann@sales.example.com")
    keys = [address.key_hash, *domain_keys_for(address.domain)]
    with count_selects(store) as selects:
        hits = await s.lookup(keys)
    assert len(selects) == 1
    assert set(hits) == {address.key_hash, domain_key("example.com")}
    (domain_hit,) = hits[domain_key("example.com")]
    assert domain_hit.kind == "domain"
    assert domain_hit.scope == "advertiser"
    assert domain_hit.reason == "manual"
    assert domain_hit.source == "cli"
    assert domain_hit.created_at.tzinfo is not None
    assert domain_hit.created_at.utcoffset() == UTC.utcoffset(None)
    (address_hit,) = hits[address.key_hash]
    assert address_hit == SuppressionHit(
        kind="address",
        key_hash=address.key_hash,
        scope="campaign",
        scope_value="spring",
        reason="unsubscribe",
        source="web",
        created_at=address_hit.created_at,
    )
    with count_selects(store) as selects:
        assert await s.lookup([]) == {}
    assert selects == []


async def test_lookup_statements_hold_at_most_900_keys(db_url: str) -> None:
    # Without the key filter (SQLite), every key goes to the database: test_keyfilter.py.
    async with Store.connect(db_url, key_filter=False) as store:
        await _statements_hold_at_most_900_keys(store)


async def _statements_hold_at_most_900_keys(store: Store) -> None:
    keys = _hashes(1801)
    await store.suppression.add_hashes(
        keys[::100], kind="address", scope="global", scope_value="", reason="import",
        source="import:feed.csv",
    )  # fmt: skip
    reader = store.suppression.reader
    # PostgreSQL: statements of 900 keys. SQLite: a batch is first split in parts read in
    # parallel (see fastread), 900 keys in two parts of 450, 1,801 in parts of 901 and 900,
    # then each part in statements of at most 900 keys.
    expected = {None: (1, 3), 1: (1, 3), 2: (2, 3)}[None if reader is None else reader.parallel]
    with count_selects(store) as selects:
        hits = await store.suppression.lookup(keys[:900])
    assert len(selects) == expected[0]
    assert len(hits) == 9
    with count_selects(store) as selects:
        hits = await store.suppression.lookup(keys)
    assert len(selects) == expected[1]
    assert set(hits) == set(keys[::100])


async def test_add_hashes_batches_validates_and_counts(store: Store) -> None:
    s = store.suppression
    keys = _hashes(1234)
    opts: dict[str, Any] = {
        "kind": "address", "scope": "advertiser", "scope_value": "acme", "reason": "import",
        "source": "import:old.csv",
    }  # fmt: skip
    assert await s.add_hashes(keys + keys[:10], **opts) == 1234
    assert await s.add_hashes(iter(keys[:600] + _hashes(5, "new")), **opts) == 5
    assert await s.count(kind="address") == 1239
    bad = "A" * 64
    with pytest.raises(InvalidInputError, match="A" * 20):
        await s.add_hashes([*_hashes(3, "x"), bad], **opts)
    with pytest.raises(InvalidInputError, match="64 lower-case hex"):
        await s.add_hashes(["abc"], **opts)
    assert await s.count() == 1239  # nothing written by the refused calls


async def test_created_at_override_keeps_the_objection_date(store: Store) -> None:
    when = datetime(2023, 5, 17, 8, 30, tzinfo=UTC)
    await store.suppression.add_address(
        "old@example.com", scope_value="acme", reason="unsubscribe", source="import:x.csv",
        created_at=when,
    )  # fmt: skip
    key = normalise("old@example.com").key_hash
    (hit,) = (await store.suppression.lookup([key]))[key]
    assert hit.created_at == when


async def test_remove_by_scope_and_value(store: Store) -> None:
    s = store.suppression
    key = normalise("rm@example.com").key_hash
    entries: list[tuple[SuppressionScope, str]] = [
        ("global", ""),
        ("advertiser", "a"),
        ("advertiser", "b"),
        ("campaign", "c"),
    ]
    for scope, value in entries:
        await s.add_hashes(
            [key], kind="address", scope=scope, scope_value=value, reason="manual", source="cli"
        )
    assert await s.remove(key, kind="domain") == 0
    assert await s.remove(key, kind="address", scope="advertiser", scope_value="b") == 1
    assert await s.remove(key, kind="address", scope="advertiser") == 1
    assert await s.remove(key, kind="address") == 2
    assert await s.lookup([key]) == {}
    with pytest.raises(InvalidInputError):
        await s.remove("nothex", kind="address")
    with pytest.raises(InvalidInputError):
        await s.remove(key, kind="person")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": "global", "scope_value": "acme"}, "global suppression takes scope_value ''"),
        ({"scope": "advertiser", "scope_value": ""}, "needs a scope_value"),
        ({"scope": "campaign", "scope_value": ""}, "needs a scope_value"),
        ({"scope": "planet", "scope_value": "x"}, "scope must be one of"),
        ({"scope_value": "bob@example.com"}, "needs a scope_value"),
        ({"scope_value": "acme", "reason": "bored"}, "reason must be one of"),
        ({"scope_value": "acme", "source": "mail from bob@example.com"}, "never a person"),
        ({"scope_value": "acme", "source": ""}, "source must be"),
        ({"scope_value": "acme", "source": "web\r\nX: y"}, "source must be"),
    ],
)
async def test_invalid_entries_are_refused(
    store: Store, options: dict[str, Any], message: str
) -> None:
    full: dict[str, Any] = {"reason": "unsubscribe", "source": "web", **options}
    with pytest.raises(InvalidInputError, match=message):
        await store.suppression.add_address("x@example.com", **full)
    with pytest.raises(InvalidInputError, match=message):
        await store.suppression.add_domain("example.com", **full)
    assert await store.suppression.count() == 0


async def test_invalid_address_or_domain_is_refused(store: Store) -> None:
    opts: dict[str, Any] = {"scope_value": "acme", "reason": "manual", "source": "cli"}
    with pytest.raises(InvalidAddressError):
        await store.suppression.add_address("not an address", **opts)
    with pytest.raises(InvalidAddressError):
        await store.suppression.add_domain("localhost", **opts)


async def test_concurrent_adds_from_two_stores_converge(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    opts: dict[str, Any] = {"scope_value": "acme", "reason": "unsubscribe", "source": "web"}
    results = await asyncio.gather(
        *(
            (first if i % 2 else second).suppression.add_address("race@example.com", **opts)
            for i in range(20)
        )
    )
    assert sorted(results) == [False] * 19 + [True]
    assert await first.suppression.count() == 1


async def test_large_lookups_are_screened_by_a_key_filter_on_sqlite_only(store: Store) -> None:
    """A SQLite file builds the key filter (tests/test_keyfilter.py); PostgreSQL has none,
    and its large lookups answer the same."""
    keys = _hashes(200)
    await store.suppression.add_hashes(
        keys[::10], kind="address", scope="global", scope_value="", reason="import",
        source="feed",
    )  # fmt: skip
    assert await store.suppression.prepare() is (store.dialect == "sqlite")
    assert set(await store.suppression.lookup(keys)) == set(keys[::10])


async def test_sqlite_parallel_batches_read_what_a_plain_query_reads(tmp_path: Path) -> None:
    """The direct reader's parallel JSON parts, and its row-by-row fallback (SQLite builds
    without JSON functions), return exactly the rows of one plain query, every column."""
    path = tmp_path / "pm.db"
    keys = _hashes(2500)
    async with Store.connect(path) as store:
        s = store.suppression
        for n, (scope, value, source) in enumerate(
            [
                ("global", "", 'import:"quoted" \\ back, slash'),
                ("advertiser", "acmé 🙂", "ünïcode ☃ <b>&amp;</b>"),
                ("campaign", "spring/2026", "one-click"),
            ]
        ):
            await s.add_hashes(
                keys[n::7], kind="address", scope=scope, scope_value=value,  # type: ignore[arg-type]
                reason="import", source=source,
            )  # fmt: skip
        hits = await s.lookup(keys)
    wanted = [*keys, *_hashes(500, "absent")]
    con = sqlite3.connect(path)
    plain = sorted(
        con.execute(
            "SELECT kind, key_hash, scope, scope_value, reason, source, created_at FROM suppression"
        )
    )
    con.close()
    assert len(plain) == len(keys[0::7]) + len(keys[1::7]) + len(keys[2::7])
    reader = SQLiteReader(str(path), parallel=3)
    try:
        parallel = sorted(tuple(r) for r in await reader.lookup(wanted))
        reader._json = False  # as on a SQLite without JSON functions
        rows = sorted(tuple(r) for r in await reader.lookup(wanted))
    finally:
        reader.close()
    assert parallel == rows == plain
    # And the store turns each row into one hit.
    assert sum(len(h) for h in hits.values()) == len(plain)


async def test_keys_sharing_the_indexed_prefix_are_told_apart(store: Store) -> None:
    """The lookup index holds a key's first 16 hex digits only: an entry for one key must not
    be reported for another key that begins with the same digits, alone or in a batch."""
    common = "0123456789abcdef"
    suppressed, other, third = (common + c * 48 for c in "abc")
    await store.suppression.add_hashes(
        [suppressed, third], kind="address", scope="global", scope_value="",
        reason="unsubscribe", source="web",
    )  # fmt: skip
    assert await store.suppression.lookup([other]) == {}
    assert set(await store.suppression.lookup([other, suppressed])) == {suppressed}
    # A batch large enough for the parallel parts, with the three keys in it.
    batch = [*_hashes(600, "absent"), other, suppressed, third]
    found = await store.suppression.lookup(batch)
    assert set(found) == {suppressed, third}
    assert [h.key_hash for h in found[suppressed]] == [suppressed]


async def test_sqlite_lookups_search_the_prefix_index(tmp_path: Path) -> None:
    """Every statement a lookup runs (the reader's, inline and in parallel parts, and the
    SQLAlchemy path of an in-memory store) searches ix_suppression_prefix: a statement the
    index does not serve would scan all 10M entries. With the key filter, the state is read
    by its primary key and the entries added since the build by theirs."""
    path = tmp_path / "pm.db"
    async with Store.connect(path) as store:
        await store.suppression.add_hashes(
            _hashes(50), kind="address", scope="global", scope_value="", reason="import",
            source="feed",
        )  # fmt: skip
        with count_selects(store) as selects:
            await store.suppression.lookup(_hashes(3))
            await store.suppression.lookup(_hashes(1000))
            assert await store.suppression.prepare()
            await store.suppression.add_hashes(
                _hashes(5, "new"), kind="address", scope="global", scope_value="",
                reason="import", source="feed",
            )  # fmt: skip
            await store.suppression.lookup(_hashes(1000))
            await store.suppression.lookup(_hashes(3))
    assert len(selects) >= 6
    con = sqlite3.connect(path)
    try:
        for statement in set(selects):
            marks = statement.count("?")
            plan = con.execute(f"EXPLAIN QUERY PLAN {statement}", ["x"] * marks).fetchall()
            details = " ".join(str(row[-1]) for row in plan)
            if "suppression_state" in statement:
                assert "USING INTEGER PRIMARY KEY" in details, (statement, details)
            elif "WHERE id >" in statement or "WHERE id =" in statement:
                # The entries added since the filter was built, and the one at its high.
                assert "SEARCH suppression USING INTEGER PRIMARY KEY" in details, details
            else:
                assert "USING INDEX ix_suppression_prefix" in details, (statement, details)
    finally:
        con.close()
    async with Store.connect("sqlite+aiosqlite:///:memory:") as memory:
        assert memory.suppression.reader is None
        seen: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if "FROM suppression" in statement and statement.lstrip().startswith("SELECT"):
                seen.append((statement, params))

        event.listen(memory.engine.sync_engine, "before_cursor_execute", capture)
        try:
            await memory.suppression.lookup(_hashes(5))
        finally:
            event.remove(memory.engine.sync_engine, "before_cursor_execute", capture)
        plans: list[str] = []
        async with memory.engine.connect() as conn:  # the one shared in-memory connection
            for statement, params in seen:
                rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                plans.append(" ".join(str(row[-1]) for row in rows))
        assert plans
        assert all("USING INDEX ix_suppression_prefix" in p for p in plans), plans
