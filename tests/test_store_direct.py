"""The direct SQLite write path (store/fastwrite.py) against the SQLAlchemy path, on one file.

Both write the same rows, so a process on either path reads what the other wrote, and the
database alone decides between them (one claim winner, one gap-free audit chain).
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from store_fixtures import behind_the_stores_back

from prospect_mailer.errors import InvalidInputError, StoreError
from prospect_mailer.pipeline import ChunkRecords
from prospect_mailer.sendplan import PlannedEvent, SendCommits, plan_event
from prospect_mailer.store import (
    AuditEvent,
    ClaimRequest,
    ClaimResult,
    FinishRequest,
    Store,
    fastwrite,
    sqlite_url,
)
from prospect_mailer.store.tables import SEND_CLAIMS

R1 = hashlib.sha256(b"one@example.com").hexdigest()


def request(send_id: str, recipient_hash: str = R1, key: str = "") -> ClaimRequest:
    return ClaimRequest(
        campaign_id="spring",
        step=1,
        recipient_hash=recipient_hash,
        advertiser_id="acme",
        send_id=send_id,
        message_key=key,
    )


def finish(send_id: str, status: str = "sent") -> FinishRequest:
    return FinishRequest(
        campaign_id="spring",
        step=1,
        recipient_hash=R1,
        send_id=send_id,
        status=status,  # type: ignore[arg-type]
        message_id=f"<{send_id}@acme.example>",
    )


def event(send_id: str, status: str) -> AuditEvent:
    return AuditEvent(
        kind="send", status=status, send_id=send_id, campaign_id="spring", recipient_hash=R1
    )


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one file: ``direct`` (fastwrite) and ``orm`` (SQLAlchemy only)."""
    url = sqlite_url(tmp_path / "pm.db")
    async with Store.connect(url) as direct, Store.connect(url) as orm:
        assert direct.claims.direct is not None
        assert direct.audit.direct is not None
        orm.claims.direct = None
        orm.audit.direct = None
        yield direct, orm


async def test_claims_race_across_both_paths_one_winner(pair: tuple[Store, Store]) -> None:
    direct, orm = pair
    results = await asyncio.gather(
        *((direct if i % 2 else orm).claims.claim_many([request(f"s{i}")]) for i in range(20))
    )
    winners = [r[0] for r in results if r[0].claimed]
    assert len(winners) == 1
    losers = {(r[0].existing_status, r[0].existing_send_id) for r in results if not r[0].claimed}
    assert len(losers) == 1
    assert next(iter(losers))[0] == "pending"


async def test_rows_written_directly_read_back_through_sqlalchemy(
    pair: tuple[Store, Store],
) -> None:
    direct, orm = pair
    before = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
    assert (await direct.claims.claim_many([request("a" * 32)]))[0].claimed
    records = await direct.finish_sends([finish("a" * 32)], [event("a" * 32, "sent")])
    claim = await orm.claims.by_send_id("a" * 32)
    assert claim is not None
    assert (claim.status, claim.message_id) == ("sent", f"<{'a' * 32}@acme.example>")
    async with orm.engine.connect() as conn:
        updated = (await conn.execute(select(SEND_CLAIMS.c.updated_at))).scalar_one()
    assert isinstance(updated, datetime)
    assert before <= updated
    # Each path chains after the other; the whole chain verifies on both.
    await orm.audit.append([event("b" * 32, "pending")])
    await direct.audit.append([event("b" * 32, "sent")])
    assert [r.seq for r in await orm.audit.events()] == [1, 2, 3]
    assert records[0].hash == (await orm.audit.events())[0].hash
    assert (await orm.audit.verify()).ok
    assert (await direct.audit.verify()).ok


async def test_records_false_writes_the_same_and_returns_none(pair: tuple[Store, Store]) -> None:
    """The pipeline's hot path skips building records back; what is stored is unchanged."""
    direct, _ = pair
    results, records = await direct.claim_and_record(
        [request("a" * 32)], lambda rs: [event("a" * 32, "pending")], records=False
    )
    assert results[0].claimed
    assert records == []
    finished = await direct.finish_sends(
        [finish("a" * 32)], [event("a" * 32, "sent")], records=False
    )
    assert finished == []
    stored = await direct.audit.events()
    assert [(r.seq, r.status, r.send_id) for r in stored] == [
        (1, "pending", "a" * 32),
        (2, "sent", "a" * 32),
    ]
    assert (await direct.audit.verify()).ok


async def test_retry_takes_over_and_duplicates_are_reported(pair: tuple[Store, Store]) -> None:
    direct, orm = pair
    first = await direct.claims.claim_many([request("s1"), request("s2")])
    assert first[0].claimed
    assert not first[1].claimed
    assert (first[1].existing_status, first[1].existing_send_id) == ("pending", "s1")
    await orm.claims.finish_many([finish("s1", "deferred")])
    retry = await direct.claims.claim_many([request("s3")])
    assert (retry[0].claimed, retry[0].taken_over, retry[0].existing_send_id) == (
        True,
        True,
        "s1",
    )
    assert not (await direct.claims.claim_many([request("s4")]))[0].claimed


async def test_send_result_is_one_transaction(pair: tuple[Store, Store], tmp_path: Path) -> None:
    direct, _ = pair
    assert (await direct.claims.claim_many([request("s1")]))[0].claimed
    con = sqlite3.connect(tmp_path / "pm.db")
    con.execute("DELETE FROM audit_head")  # the audit append will fail
    con.commit()
    with pytest.raises(StoreError, match="chain head is missing"):
        await direct.finish_sends([finish("s1")], [event("s1", "sent")])
    # ...and the claim finish before it in the same transaction was rolled back.
    assert await direct.claims.statuses("spring", 1, [R1]) == {R1: "pending"}
    con.close()


async def test_database_errors_become_store_errors(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        behind_the_stores_back(path, "DROP TABLE send_claims")
        with pytest.raises(StoreError, match="claiming sends failed: OperationalError"):
            await store.claims.claim_many([request("s1")])
    with pytest.raises(StoreError, match="closed"):
        await store.audit.append([event("s1", "sent")])


async def test_a_claim_never_exists_without_its_record(tmp_path: Path) -> None:
    """SQLite: claim and `pending` record in one transaction; a failed record undoes it."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        behind_the_stores_back(path, "DELETE FROM audit_head")  # appending records will fail
        with pytest.raises(StoreError, match="chain head is missing"):
            await store.claim_and_record([request("s1")], lambda rs: [event("s1", "pending")])
        assert await store.claims.statuses("spring", 1, [R1]) == {}


async def test_writer_takes_the_lock_as_soon_as_another_process_frees_it(tmp_path: Path) -> None:
    """SQLite's busy handler would sleep 1, 2, 5, 10, 15, 20... ms between attempts; the
    writer polls instead, so it commits within a few ms of the lock being released."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        claim = asyncio.ensure_future(store.claims.claim_many([request("s1")]))
        # SQLite's handler tries at 0, 1, 3, 8 ... 228, 328, 428 ms: freed at 360 ms, it would
        # take the lock about 68 ms late. The writer polls every 2 ms at most.
        await asyncio.sleep(0.36)
        assert not claim.done()
        released = time.monotonic()
        other.execute("COMMIT")
        (result,) = await claim
        waited = time.monotonic() - released
        other.close()
    assert result.claimed
    assert waited < 0.05


def test_writer_gives_up_on_a_lock_held_too_long(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    # The writer's connection has SQLite's busy handler off: the writer polls instead.
    writer = fastwrite.SQLiteWriter(str(path))
    con = writer._connection()
    assert con.execute("PRAGMA busy_timeout").fetchone() == (0,)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        fastwrite._begin_immediate(con, timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1
    holder.close()
    writer.close()


async def test_orm_writes_take_the_lock_as_soon_as_another_process_frees_it(
    tmp_path: Path,
) -> None:
    """Writes through SQLAlchemy (unsubscribes, imports, the CLI) poll for the write lock as
    the direct writer does: an objection does not wait out SQLite's 100 ms sleeps while a
    relay commits hundreds of times a second."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        adding = asyncio.ensure_future(
            store.suppression.add_address(
                "ann@example.com", scope_value="acme", reason="unsubscribe", source="web"
            )
        )
        await asyncio.sleep(0.36)  # SQLite's own handler would retry at 428 ms
        assert not adding.done()
        released = time.monotonic()
        other.execute("COMMIT")
        assert await adding is True
        waited = time.monotonic() - released
        other.close()
        assert await store.suppression.count() == 1
    assert waited < 0.05


def _hash(n: int) -> str:
    return hashlib.sha256(f"r{n}@example.com".encode()).hexdigest()


def _finish_of(send_id: str, n: int, status: str = "sent") -> FinishRequest:
    return FinishRequest(
        campaign_id="spring",
        step=1,
        recipient_hash=_hash(n),
        send_id=send_id,
        status=status,  # type: ignore[arg-type]
        message_id=f"<{send_id}@acme.example>",
    )


async def _claim_rows(store: Store) -> list[tuple[object, ...]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(
                SEND_CLAIMS.c.recipient_hash, SEND_CLAIMS.c.status, SEND_CLAIMS.c.send_id,
                SEND_CLAIMS.c.message_id,
            ).order_by(SEND_CLAIMS.c.recipient_hash)
        )  # fmt: skip
        return [tuple(r) for r in rows]


@pytest.mark.parametrize("old_sqlite", [False, True], ids=["sqlite", "sqlite-3.32-999-params"])
@pytest.mark.parametrize("size", [5, 1_203])
async def test_batched_statements_decide_as_the_orm_path_claim_by_claim(
    tmp_path: Path, size: int, old_sqlite: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The direct path claims a batch in one multi-row INSERT and finishes it in one UPDATE
    ... FROM (per 500), falling back to one claim at a time when a claim exists: on the same
    history, it gives the results, and leaves the rows, of the SQLAlchemy path, which claims
    one at a time. Batches over 500 take several statements."""

    async def history(store: Store) -> tuple[list[object], list[int], list[object]]:
        # Claims already there: 1 pending, 2 failed (retryable), 3 sent.
        await store.claims.claim_many([request(f"old{i}", _hash(i)) for i in (1, 2, 3)])
        await store.claims.finish_many([_finish_of("old2", 2, "failed"), _finish_of("old3", 3)])
        new = await store.claims.claim_many([request(f"n{i}", _hash(i)) for i in range(4, size)])
        mixed = await store.claims.claim_many(
            [
                request("m0", _hash(0)),  # new
                request("m1", _hash(1)),  # a duplicate of a pending claim
                request("m2", _hash(2)),  # takes the failed one over
                request("m3", _hash(3)),  # a duplicate of a sent one
                request("m0b", _hash(0)),  # the same key twice in the batch
            ]
        )
        matched = [
            await store.claims.finish_many([_finish_of(f"n{i}", i) for i in range(4, size)]),
            await store.claims.finish_many(
                [
                    _finish_of("m0", 0),
                    _finish_of("m2", 2, "deferred"),
                    _finish_of("m1", 1),  # not its claim: matches nothing
                    _finish_of("m0", 0, "failed"),  # the same claim twice: the last one wins
                ]
            ),
        ]
        return [*new, *mixed], matched, await _claim_rows(store)

    async with Store.connect(sqlite_url(tmp_path / "direct.db")) as direct:
        assert direct.claims.direct is not None
        if old_sqlite:
            # As a SQLite older than 3.33 (no UPDATE ... FROM), built with 999 parameters a
            # statement: the batches fit the limit, the results go one statement each.
            monkeypatch.setattr(fastwrite, "_UPDATE_FROM", False)
            direct.claims.direct._connection().setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        got = await history(direct)
    async with Store.connect(sqlite_url(tmp_path / "orm.db")) as orm:
        orm.claims.direct = None
        expected = await history(orm)
    assert got == expected
    results, matched, rows = got
    assert matched == [size - 4, 3]
    assert sum(1 for r in results if r.claimed) == size - 4 + 2  # type: ignore[attr-defined]
    assert len(rows) == size


async def test_a_send_transaction_runs_the_same_statements_for_any_batch(tmp_path: Path) -> None:
    """Each statement is a round trip for the GIL: a group commit of 40 sends runs as many
    statements as one of 2 (claims with their records; results with theirs)."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        writer = store.claims.direct
        assert writer is not None
        seen: list[str] = []
        await store.claims.statuses("spring", 1, [R1])  # the writer connection opens lazily
        counts = []
        for size, offset in ((2, 0), (40, 100)):
            sends = [(f"s{offset + i}", offset + i) for i in range(size)]
            writer._connection().set_trace_callback(seen.append)
            seen.clear()
            await store.claim_and_record(
                [request(s, _hash(n)) for s, n in sends],
                lambda rs, sends=sends: [  # type: ignore[misc]
                    event(s, "pending") for s, _ in sends
                ],
                records=False,
            )
            claimed = len(seen)
            seen.clear()
            await store.finish_sends(
                [_finish_of(s, n) for s, n in sends],
                [event(s, "sent") for s, _ in sends],
                records=False,
            )
            counts.append((claimed, len(seen)))
        writer._connection().set_trace_callback(None)
        assert counts[0] == counts[1]
        assert counts[0] == (7, 6), seen
        assert await store.claims.statuses("spring", 1, [_hash(100)]) == {_hash(100): "sent"}
        assert (await store.audit.verify()).ok


async def test_the_batched_finish_searches_each_claim_by_its_key(tmp_path: Path) -> None:
    """One UPDATE ... FROM (VALUES ...) for many results: each row must find its claim
    through the unique key's index, never by scanning every claim of the store."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)):
        pass
    sql = fastwrite._rows_sql(
        fastwrite._FINISH_MANY_HEAD, fastwrite._FINISH_ROW, 3, fastwrite._FINISH_MANY_TAIL
    )
    con = sqlite3.connect(path)
    try:
        plan = [row[-1] for row in con.execute(f"EXPLAIN QUERY PLAN {sql}", ["x"] * 22)]
    finally:
        con.close()
    claims = [p for p in plan if "send_claims" in p]
    assert claims, plan
    assert all(p.startswith("SEARCH send_claims USING INDEX") for p in claims), plan
    assert "campaign_id=? AND step=? AND recipient_hash=? AND message_key=?" in claims[0]


def _fail_on(path: Path, what: str) -> None:
    """A trigger that makes every ``what`` (INSERT or UPDATE) on send_claims fail."""
    behind_the_stores_back(
        path,
        f"CREATE TRIGGER no_{what.lower()} BEFORE {what} ON send_claims "
        "BEGIN SELECT RAISE(ABORT, 'the disk says no'); END",
    )


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "sqlalchemy"])
async def test_commit_sends_keeps_the_results_when_the_claims_fail(
    tmp_path: Path, direct: bool
) -> None:
    """Claims and results share a transaction (a group commit of both kinds); a failure of
    the claims must not lose the results of sends that were made, nor their records."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        if not direct:
            store.claims.direct = None
            store.audit.direct = None
        assert (await store.claims.claim_many([request("s1")]))[0].claimed
        _fail_on(path, "INSERT")
        claimed, failed = await store.commit_sends(
            [request("s2", _hash(2))],
            lambda rs: [event("s2", "pending")] if rs else [],
            [finish("s1")],
            [event("s1", "sent")],
        )
        assert isinstance(claimed, StoreError)
        assert "the disk says no" in str(claimed)
        assert failed is None
        assert await store.claims.statuses("spring", 1, [R1, _hash(2)]) == {R1: "sent"}
        assert [(r.send_id, r.status) for r in await store.audit.events()] == [("s1", "sent")]
        assert (await store.audit.verify()).ok


async def test_commit_sends_fails_both_kinds_when_the_results_fail(tmp_path: Path) -> None:
    """On the direct path a failure of the results (or of the records) rolls back the whole
    transaction: nothing of either kind is written, and both kinds' callers are told."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        assert (await store.claims.claim_many([request("s1")]))[0].claimed
        _fail_on(path, "UPDATE")
        claimed, failed = await store.commit_sends(
            [request("s2", _hash(2))],
            lambda rs: [event("s2", "pending")],
            [finish("s1")],
            [event("s1", "sent")],
        )
        assert isinstance(claimed, StoreError)
        assert isinstance(failed, StoreError)
        assert await store.claims.statuses("spring", 1, [R1, _hash(2)]) == {R1: "pending"}
        assert await store.audit.events() == []


async def test_commit_sends_refuses_a_malformed_kind_alone(tmp_path: Path) -> None:
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        assert (await store.claims.claim_many([request("s1")]))[0].claimed
        claimed, failed = await store.commit_sends(
            [request("", _hash(2))],  # no send id
            lambda rs: [event("s2", "pending")],
            [finish("s1")],
            [event("s1", "sent")],
        )
        assert isinstance(claimed, InvalidInputError)
        assert failed is None
        assert await store.claims.statuses("spring", 1, [R1, _hash(2)]) == {R1: "sent"}
        assert [(r.send_id, r.status) for r in await store.audit.events()] == [("s1", "sent")]
        # A malformed result beside claims whose transaction fails: both kinds are told,
        # the results' callers with their own error.
        _fail_on(tmp_path / "pm.db", "INSERT")
        claimed, failed = await store.commit_sends(
            [request("s3", _hash(3))],
            lambda rs: [event("s3", "pending")],
            [finish("s1", "no-such-status")],
            [event("s1", "sent")],
        )
        assert isinstance(claimed, StoreError)
        assert isinstance(failed, InvalidInputError)
        assert "no-such-status" in str(failed)


async def test_concurrent_claims_and_results_share_transactions(tmp_path: Path) -> None:
    """The pipeline's group commit takes both kinds together: sends finishing while others
    claim need fewer transactions (fsyncs) than one per kind and batch."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)) as store:
        writer = store.claims.direct
        assert writer is not None
        for i in range(10):
            assert (await store.claims.claim_many([request(f"a{i}", _hash(i))]))[0].claimed
        commits: SendCommits[list[ClaimRequest], list[ClaimResult]] = SendCommits(
            lambda claims, results: _commit(store, claims, results)
        )
        begins: list[str] = []
        writer._connection().set_trace_callback(
            lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None
        )
        outcomes = await asyncio.gather(
            *(commits.submit(_finish_of(f"a{i}", i), event(f"a{i}", "sent")) for i in range(10)),
            *(commits.claim([request(f"b{i}", _hash(100 + i))]) for i in range(10)),
        )
        writer._connection().set_trace_callback(None)
        assert outcomes[:10] == [None] * 10
        assert all(r[0].claimed for r in outcomes[10:])  # type: ignore[index]
        assert len(begins) <= 2  # the first item alone, then everything queued meanwhile
        statuses = await store.claims.statuses("spring", 1, [_hash(i) for i in range(10)])
        assert set(statuses.values()) == {"sent"}
        assert (await store.audit.verify()).ok


async def test_a_cancelled_caller_takes_nothing_down_with_it(tmp_path: Path) -> None:
    """A caller cancelled while its commit runs (a relay client that hung up): the batch it
    was in is still committed, the others in it get their results, and later batches go on
    (each caller waits on a future of its own; the drain is a task of its own)."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        gate = asyncio.Event()
        calls = 0

        async def held(
            claims: list[list[ClaimRequest]], results: list[tuple[FinishRequest, AuditEvent]]
        ) -> tuple[list[list[ClaimResult]] | Exception, Exception | None]:
            nonlocal calls
            calls += 1
            if calls == 1:
                await gate.wait()  # the first commit runs until released
            return await _commit(store, claims, results)

        commits: SendCommits[list[ClaimRequest], list[ClaimResult]] = SendCommits(held)
        first = asyncio.ensure_future(commits.claim([request("c1", _hash(1))]))
        second = asyncio.ensure_future(commits.claim([request("c2", _hash(2))]))
        await asyncio.sleep(0.01)
        assert calls == 1  # both in the first batch, which is held
        first.cancel()  # the task that started the drain
        await asyncio.sleep(0.01)
        gate.set()
        assert (await asyncio.wait_for(second, 10))[0].claimed
        with pytest.raises(asyncio.CancelledError):
            await first
        # The cancelled caller's claim was committed with the batch (the database decides).
        statuses = await store.claims.statuses("spring", 1, [_hash(1), _hash(2)])
        assert statuses == {_hash(1): "pending", _hash(2): "pending"}
        assert (await commits.claim([request("c3", _hash(3))]))[0].claimed  # and on it goes
        assert calls == 2


async def _commit(
    store: Store, claims: list[list[ClaimRequest]], results: list[tuple[FinishRequest, AuditEvent]]
) -> tuple[list[list[ClaimResult]] | Exception, Exception | None]:
    flat = [r for batch in claims for r in batch]
    claimed, failed = await store.commit_sends(
        flat, lambda rs: [], [r for r, _ in results], [e for _, e in results]
    )
    if isinstance(claimed, Exception):
        return claimed, failed
    return [[c] for c in claimed], failed


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "sqlalchemy"])
async def test_a_malformed_record_fails_its_own_kind_only(tmp_path: Path, direct: bool) -> None:
    """A record the audit log refuses (details over 64 KiB) fails the sends of its kind; the
    claims or results of the other kind in the same group commit are still written."""
    huge = {"smtp_reply": "x" * 70_000}
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        if not direct:
            store.claims.direct = None
            store.audit.direct = None
        assert (await store.claims.claim_many([request("s1")]))[0].claimed
        # A result whose record is malformed, beside a good claim.
        bad_result = AuditEvent(
            kind="send", status="sent", send_id="s1", campaign_id="spring", details=huge
        )
        claimed, failed = await store.commit_sends(
            [request("s2", _hash(2))],
            lambda rs: [event("s2", "pending")],
            [finish("s1")],
            [bad_result],
        )
        assert isinstance(failed, InvalidInputError)
        assert not isinstance(claimed, Exception)
        assert claimed[0].claimed
        # A claim whose record is malformed, beside a good result.
        bad_claim = AuditEvent(
            kind="send", status="pending", send_id="s3", campaign_id="spring", details=huge
        )
        claimed, failed = await store.commit_sends(
            [request("s3", _hash(3))], lambda rs: [bad_claim], [finish("s1")], [event("s1", "sent")]
        )
        assert isinstance(claimed, InvalidInputError)
        assert failed is None
        statuses = await store.claims.statuses("spring", 1, [R1, _hash(2), _hash(3)])
        # The direct path claims and records in one transaction; the SQLAlchemy path commits
        # the claim first (the pipeline then releases it, as for any failed record).
        assert statuses.pop(_hash(3), None) == (None if direct else "pending")
        assert statuses == {R1: "sent", _hash(2): "pending"}
        assert [(r.send_id, r.status) for r in await store.audit.events()] == [
            ("s2", "pending"),
            ("s1", "sent"),
        ]
        assert (await store.audit.verify()).ok


async def test_the_writer_keeps_statement_journals_in_memory(tmp_path: Path) -> None:
    """A savepoint or a multi-row statement needs a statement journal: in memory on the
    writer's connection, not a temporary file created and unlinked in every transaction."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        writer = store.claims.direct
        assert writer is not None
        (mode,) = await writer.run(
            "reading", lambda con: con.execute("PRAGMA temp_store").fetchone()
        )
        assert mode == 2  # MEMORY


def planned(send_id: str, status: str, **extra: object) -> PlannedEvent:
    base = {"kind": "send", "campaign_id": "spring", "recipient_hash": R1, "details": {"a": 1}}
    return PlannedEvent(base, send_id, status, dict(extra))


def test_a_planned_event_builds_the_record_plan_event_builds() -> None:
    """Called (once unpickled too), a result's planned record is the record built at once."""
    p = planned("s1", "sent", smtp_code=250, smtp_reply="ok", gone=None)
    built = plan_event(p.base, "s1", "sent", extra={"smtp_code": 250, "smtp_reply": "ok"})
    assert p() == built
    assert pickle.loads(pickle.dumps(p))() == built
    assert built.details == {"a": 1, "smtp_code": 250, "smtp_reply": "ok"}


@pytest.mark.parametrize("way", ["thread", "process", "sqlalchemy"])
async def test_commit_sends_builds_planned_records_where_it_writes(
    tmp_path: Path, way: str
) -> None:
    """A planned result record is written as the built one is, by the writer thread, the
    writer process or the general path; one that fails its checks fails the results'
    part alone (the claims and their records are committed), as a malformed record does."""
    url = sqlite_url(tmp_path / "pm.db")
    async with Store.connect(url, writer_process=way == "process") as store:
        if way == "sqlalchemy":
            store.claims.direct = None
            store.audit.direct = None
        assert (await store.claims.claim_many([request("s1")]))[0].claimed
        sent = planned("s1", "sent", smtp_code=250)
        claimed, failed = await store.commit_sends([], ChunkRecords([], []), [finish("s1")], [sent])
        assert claimed == []
        assert failed is None
        (record,) = await store.audit.events()
        assert (record.send_id, record.status, record.details["smtp_code"]) == ("s1", "sent", 250)
        assert await store.claims.statuses("spring", 1, [R1]) == {R1: "sent"}

        assert (await store.claims.claim_many([request("s2", _hash(2))]))[0].claimed
        base = {"kind": "send", "campaign_id": "spring", "recipient_hash": _hash(3), "details": {}}
        claimed, failed = await store.commit_sends(
            [request("s3", _hash(3))],
            ChunkRecords([], [(base, "s3", {}, None)]),  # s3's pending record if claimed
            [finish("s2")],
            [planned("s2", "Not A Word")],  # fails AuditEvent's checks when built
        )
        assert isinstance(failed, InvalidInputError)
        assert "status" in str(failed)
        assert not isinstance(claimed, Exception)
        assert claimed[0].claimed
        statuses = await store.claims.statuses("spring", 1, [_hash(2), _hash(3)])
        assert statuses == {_hash(2): "pending", _hash(3): "pending"}
        assert [r.status for r in await store.audit.events()] == ["sent", "pending"]
        assert (await store.audit.verify()).ok
