"""The send pipeline's group commits in a child process (store/writer_process.py), for real:
a SQLite file, the child started by the store, an aiosmtpd sink upstream."""

from __future__ import annotations

import asyncio
import io
import operator
import os
import pickle
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from factories import BASE, CAMPAIGN, KEY, MAILTO_DOMAIN, NOW, b2b
from smtp_fixtures import SMTPTestServer

from prospect_mailer.errors import StoreError
from prospect_mailer.mailer import ProspectMailer
from prospect_mailer.pipeline import BatchRecords, ChunkRecords
from prospect_mailer.relay_config import RelaySettings
from prospect_mailer.sendplan import SendCommits
from prospect_mailer.store import ClaimRequest, ClaimResult, Store, fastwrite, sqlite_url
from prospect_mailer.store.fastwrite import SendsCommit, SQLiteWriter
from prospect_mailer.store.writer_process import _HEADER, ProcessWriter, _Requests, _serve
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import SMTPTransport

MARIE, PAUL = "marie.curie@radium.example", "paul.langevin@radium.example"
#: A query that keeps SQLite busy for seconds.
SLOW_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 200000000) "
    "SELECT count(*) FROM c"
)


def mailer_for(store: Store, sink: SMTPTestServer) -> ProspectMailer:
    return ProspectMailer(
        store=store,
        transport=SMTPTransport(sink.host, sink.port, timeout=5),
        signer=TokenSigner([KEY]),
        base_url=BASE,
        mailto_domain=MAILTO_DOMAIN,
        clock=lambda: NOW,
    )


def writer_of(store: Store) -> ProcessWriter:
    writer = store._sends_writer
    assert isinstance(writer, ProcessWriter)
    return writer


async def test_sends_are_committed_by_the_child_as_by_the_thread(
    tmp_path: Path, smtpd_server: SMTPTestServer
) -> None:
    """The same rows as the writer thread writes: a claim per send, its pending and sent
    records in one gap-free chain, the claim finished."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        assert writer_of(store).pid != os.getpid()
        await store.prospects.upsert_many([b2b(MARIE), b2b(PAUL, name="Paul Langevin")])
        mailer = mailer_for(store, smtpd_server)
        try:
            outcomes = [o async for o in mailer.iter_send([b2b(MARIE), b2b(PAUL)], CAMPAIGN)]
        finally:
            await mailer.close()
        assert [o.status for o in outcomes] == ["sent", "sent"]
        assert len(smtpd_server.messages) == 2
        events = await store.audit.events()
        for o in outcomes:
            mine = [e.status for e in events if e.send_id == o.send_id]
            assert mine == ["pending", "sent"]
        assert (await store.audit.verify()).ok
        hashes = sorted({e.recipient_hash for e in events if e.recipient_hash})
        statuses = await store.claims.statuses(CAMPAIGN.id, CAMPAIGN.step, hashes)
        assert sorted(statuses.values()) == ["sent", "sent"]
        # Sent again: the claims (made by the child) make both duplicates.
        again = await mailer_for(store, smtpd_server).send(b2b(MARIE), CAMPAIGN)
        assert again.status == "duplicate"
        assert len(smtpd_server.messages) == 2


async def test_a_child_that_ends_fails_its_commits_closed_and_is_started_again(
    tmp_path: Path,
    smtpd_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that dies in a commit (killed, out of memory): that commit fails, so its
    sends are not made; the next commit starts a new child, at most once a
    RESTART_INTERVAL (until then sends fail closed, nothing delivered)."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        await store.prospects.upsert_many([b2b(MARIE)])
        writer = writer_of(store)
        first = writer.pid
        monkeypatch.setattr(ProcessWriter, "RESTART_INTERVAL", 3600.0)
        # A work that ends the child in the middle of its transaction (SystemExit).
        with pytest.raises(StoreError, match=r"ended unexpectedly \(exit code 1\)"):
            await writer.run("recording sends", sys.exit)
        assert "the commits in flight failed" in caplog.text
        mailer = mailer_for(store, smtpd_server)
        try:
            refused = await mailer.send(b2b(MARIE), CAMPAIGN)
            assert refused.status == "failed"
            assert "writer process ended unexpectedly" in refused.detail
            assert smtpd_server.messages == []
            # Killed from outside: noticed at once, and started again by the next commit.
            monkeypatch.setattr(ProcessWriter, "RESTART_INTERVAL", 0.0)
            assert (await mailer.send(b2b(MARIE), CAMPAIGN)).status == "sent"
            second = writer.pid
            assert second != first
            os.kill(second, signal.SIGKILL)
            for _ in range(200):
                if writer._ended is not None:
                    break
                await asyncio.sleep(0.01)
            assert "exit code -9" in str(writer._ended)
            await store.prospects.upsert_many([b2b(PAUL, name="Paul Langevin")])
            assert (await mailer.send(b2b(PAUL), CAMPAIGN)).status == "sent"
            assert writer.pid not in (first, second)
        finally:
            await mailer.close()
        assert len(smtpd_server.messages) == 2
        assert "the writer process was started again" in caplog.text
        assert (await store.audit.verify()).ok


async def test_commits_in_flight_as_the_child_dies_all_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty commits from concurrent sends, the child killed among them, in the middle of a
    long transaction: each commit either commits (and is then durable) or fails with a
    StoreError; none waits for ever, and those after the death go to a new child."""
    monkeypatch.setattr(ProcessWriter, "RESTART_INTERVAL", 0.0)
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        writer = writer_of(store)

        async def commit(i: int) -> list[ClaimResult] | Exception:
            rh = f"{i:064x}"
            base = {"kind": "send", "campaign_id": "spring", "step": 1, "recipient_hash": rh}
            records = ChunkRecords([], [({**base, "details": {}}, f"s{i}", {}, None)])
            await asyncio.sleep(0.01 * i)
            claimed, _ = await store.commit_sends(
                [ClaimRequest("spring", 1, rh, "acme", f"s{i}")], records, [], []
            )
            return claimed

        async def slow_then_killed() -> None:
            await asyncio.sleep(0.05)
            # Seconds of work in the child's transaction (a picklable call on the connection).
            slow = operator.methodcaller("execute", SLOW_QUERY)
            running = asyncio.ensure_future(writer.run("a long transaction", slow))
            await asyncio.sleep(0.15)
            os.kill(writer.pid, signal.SIGKILL)
            with pytest.raises(StoreError, match="ended unexpectedly"):
                await running

        *results, _ = await asyncio.wait_for(
            asyncio.gather(*(commit(i) for i in range(40)), slow_then_killed()), 60
        )
        committed = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
        failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
        assert all(isinstance(results[i], StoreError) for i in failed)
        assert failed  # queued behind the long transaction as the child died
        assert committed[0] == 0  # before it
        assert committed[-1] == 39  # after it, in a new child
        hashes = [f"{i:064x}" for i in committed]
        statuses = await store.claims.statuses("spring", 1, hashes)
        assert set(statuses) == set(hashes)  # every commit reported is durable
        assert (await store.audit.verify()).ok


async def test_work_that_cannot_go_to_the_child_is_refused_alone(tmp_path: Path) -> None:
    """A work that does not pickle (a lambda) is a StoreError for its callers; the child
    goes on with the next one."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        req = ClaimRequest("spring", 1, "a" * 64, "acme", "s1")
        claimed, failed = await store.commit_sends([req], lambda rs: [], [], [])
        assert isinstance(claimed, StoreError)
        assert "cannot go to the writer process" in str(claimed)
        assert failed is None
        base = {"kind": "send", "campaign_id": "spring", "step": 1, "recipient_hash": "a" * 64}
        records = ChunkRecords([], [({**base, "details": {}}, "s1", {}, "<m1@acme.example>")])
        claimed, failed = await store.commit_sends([req], records, [], [])
        assert not isinstance(claimed, Exception)
        assert [c.claimed for c in claimed] == [True]
        assert await store.claims.statuses("spring", 1, ["a" * 64]) == {"a" * 64: "pending"}
        (pending,) = await store.audit.events()
        assert (pending.send_id, pending.status, pending.message_id) == (
            "s1",
            "pending",
            "<m1@acme.example>",
        )


class OnlyHere:
    """A work the child cannot unpickle: it lives in this test module, not in the package."""

    def __call__(self, con: object) -> None:
        raise AssertionError("never run")


async def test_work_the_child_cannot_unpickle_is_answered_and_the_child_goes_on(
    tmp_path: Path,
) -> None:
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        writer = writer_of(store)
        pid = writer.pid
        with pytest.raises(ModuleNotFoundError, match="test_writer_process"):
            await writer.run("recording sends", OnlyHere())
        req = ClaimRequest("spring", 1, "b" * 64, "acme", "s2")
        claimed, failed = await store.commit_sends(
            [req], ChunkRecords([], [({"kind": "send", "details": {}}, "s2", {}, None)]), [], []
        )
        assert failed is None
        assert not isinstance(claimed, Exception)
        assert [c.claimed for c in claimed] == [True]
        assert writer.pid == pid  # the same child


async def test_closing_the_store_ends_the_child(tmp_path: Path) -> None:
    store = await Store.open(sqlite_url(tmp_path / "pm.db"), writer_process=True)
    writer = writer_of(store)
    await store.close()
    assert writer._proc.returncode == 0
    with pytest.raises(StoreError, match="the store is closed"):
        await writer.run("recording sends", ChunkRecords([], []))
    assert writer._proc.returncode == 0  # not started again


async def test_a_child_that_cannot_open_the_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="could not open"):
        await ProcessWriter.start(str(tmp_path / "no-such-dir" / "pm.db"))


def test_the_relay_setting() -> None:
    assert RelaySettings().writer == "auto"
    assert RelaySettings().writer_process  # one worker: the child
    assert not RelaySettings(workers=2).writer_process  # several: a thread each
    assert RelaySettings(workers=2, writer="process").writer_process
    assert not RelaySettings(writer="thread").writer_process
    with pytest.raises(ValueError, match="writer"):
        RelaySettings(writer="fork")  # type: ignore[arg-type]


def claim_work(i: int) -> tuple[ClaimRequest, ChunkRecords]:
    """A claim of recipient ``i`` and its record, as the pipeline sends them."""
    rh = f"{i:064x}"
    base = {"kind": "send", "campaign_id": "spring", "step": 1, "recipient_hash": rh}
    return ClaimRequest("spring", 1, rh, "acme", f"s{i}"), ChunkRecords(
        [], [({**base, "details": {}}, f"s{i}", {}, None)]
    )


def sends_work(i: int) -> SendsCommit:
    """The transaction ``Store.commit_sends`` sends the child for :func:`claim_work`."""
    req, records = claim_work(i)
    return SendsCommit([req], records, [], [], False, NOW)


def frame(what: str, work: object) -> bytes:
    data = pickle.dumps((what, work))
    return _HEADER.pack(len(data)) + data


def answers_in(out: bytes) -> list[tuple[bool, object]]:
    got = []
    while out:
        (size,) = _HEADER.unpack_from(out)
        got.append(pickle.loads(out[_HEADER.size : _HEADER.size + size]))
        out = out[_HEADER.size + size :]
    return got


async def test_the_child_runs_queued_commits_in_one_transaction_each_failing_alone(
    tmp_path: Path,
) -> None:
    """The child's loop (run here, in this process, on a pipe): the requests already queued
    go into one transaction (one BEGIN, one fsync), each in its own savepoint; a work that
    fails (a database error, any other exception) or that cannot be unpickled is answered with
    its error and rolled back alone; the answers keep the requests' order."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)):
        pass  # the schema
    bad_sql = operator.methodcaller("execute", "INSERT INTO no_such_table VALUES (1)")
    requests = [frame("claim", sends_work(i)) for i in range(3)]
    requests.insert(1, frame("bad sql", bad_sql))
    requests.insert(3, b"".join([_HEADER.pack(5), b"junk!"]))  # does not unpickle
    requests.append(frame("bad call", operator.itemgetter(5)))  # a TypeError
    writer = SQLiteWriter(str(path))
    begins: list[str] = []
    writer._connection().set_trace_callback(
        lambda sql: begins.append(sql) if sql.startswith("BEGIN") else None
    )
    read, write = os.pipe()
    os.write(write, b"".join(requests))
    os.close(write)
    out = io.BytesIO()
    try:
        _serve(_Requests(read), writer, out)  # type: ignore[arg-type]
    finally:
        os.close(read)
        writer.close()
    assert len(begins) == 1
    got = answers_in(out.getvalue())
    assert [ok for ok, _ in got] == [True, False, True, False, True, False]
    assert isinstance(got[1][1], StoreError)
    assert "bad sql failed" in str(got[1][1])
    assert "no_such_table" in str(got[1][1])
    assert isinstance(got[3][1], pickle.UnpicklingError)
    assert isinstance(got[5][1], TypeError)  # not a database error: passed on as it is
    async with Store.connect(sqlite_url(path)) as store:
        hashes = [f"{i:064x}" for i in range(3)]
        assert await store.claims.statuses("spring", 1, hashes) == dict.fromkeys(hashes, "pending")
        assert [e.send_id for e in await store.audit.events()] == ["s0", "s1", "s2"]
        assert (await store.audit.verify()).ok


async def test_a_merged_transaction_that_cannot_begin_fails_every_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the transaction itself fails, nothing is written and every work is told."""
    path = tmp_path / "pm.db"
    async with Store.connect(sqlite_url(path)):
        pass
    begin = fastwrite._begin_immediate
    monkeypatch.setattr(fastwrite, "_begin_immediate", lambda con: begin(con, timeout=0.05))
    writer = SQLiteWriter(str(path))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held past the writer's wait
    try:
        got = writer.transactions([("one", sends_work(0)), ("two", sends_work(1))])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        writer.close()
    assert [ok for ok, _ in got] == [False, False]
    assert all(isinstance(e, StoreError) and "locked" in str(e) for _, e in got)
    async with Store.connect(sqlite_url(path)) as store:
        assert await store.audit.events() == []


async def test_group_commits_overlap_through_the_writer_process(tmp_path: Path) -> None:
    """With the writer process the pipeline keeps up to IN_FLIGHT group commits under way
    (the child merges those queued): never more, every item committed once, in order of
    need (a result after its claim)."""
    async with Store.connect(sqlite_url(tmp_path / "pm.db"), writer_process=True) as store:
        assert store.send_commits_in_flight == ProcessWriter.IN_FLIGHT > 1
        running = peak = 0

        async def commit(
            claims: list[tuple[ClaimRequest, ChunkRecords]], results: list[object]
        ) -> tuple[list[ClaimResult] | Exception, Exception | None]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                claimed, failed = await store.commit_sends(
                    [c for c, _ in claims],
                    BatchRecords([(1, r) for _, r in claims]),
                    [],
                    [],
                )
                return claimed, failed
            finally:
                running -= 1

        commits: SendCommits[tuple[ClaimRequest, ChunkRecords], ClaimResult] = SendCommits(
            commit,  # type: ignore[arg-type]
            store.send_commits_in_flight,
        )

        async def one(i: int) -> bool:
            await asyncio.sleep(0.001 * (i % 7))
            return (await commits.claim(claim_work(i))).claimed

        assert all(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60))
        assert 1 < peak <= ProcessWriter.IN_FLIGHT
        hashes = [f"{i:064x}" for i in range(200)]
        statuses = await store.claims.statuses("spring", 1, hashes)
        assert statuses == dict.fromkeys(hashes, "pending")
        assert len(await store.audit.events()) == 200
        assert (await store.audit.verify()).ok
    async with Store.connect(sqlite_url(tmp_path / "pm.db")) as store:
        assert store.send_commits_in_flight == 1  # the thread: one at a time


def test_in_flight_must_be_positive() -> None:
    async def commit(claims: list[int], results: list[object]) -> tuple[list[int], None]:
        return claims, None

    with pytest.raises(ValueError, match="in_flight"):
        SendCommits(commit, 0)  # type: ignore[arg-type]
