"""The send pipeline's group commits in a child process (store/writer_process.py), for real:
a SQLite file, the child started by the store, an aiosmtpd sink upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import operator
import os
import pickle
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from factories import BASE, CAMPAIGN, KEY, MAILTO_DOMAIN, NOW, b2b
from smtp_fixtures import SMTPTestServer

from prospect_mailer.errors import StoreError
from prospect_mailer.mailer import ProspectMailer
from prospect_mailer.pipeline import BatchRecords, ChunkRecords
from prospect_mailer.relay_config import RelaySettings
from prospect_mailer.sendplan import PlannedEvent
from prospect_mailer.store import ClaimRequest, ClaimResult, FinishRequest, Store, sqlite_url
from prospect_mailer.store.fastwrite import SendsCommit
from prospect_mailer.store.pickling import plain_pickle
from prospect_mailer.store.writer_process import ProcessWriter
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


def test_commit_data_pickles_as_plain_values() -> None:
    """What every commit sends to the child pickles as its class and field values (no
    dataclass state dicts) and comes back equal."""
    now = datetime.now(UTC)
    claim = ClaimRequest("spring", 1, "a" * 64, "acme", "s1", "key")
    finish = FinishRequest("spring", 1, "a" * 64, "s1", "sent", "<m@x.example>", "key")
    records = ChunkRecords([], [({"kind": "send", "details": {}}, "s1", {}, None)])
    planned = PlannedEvent({"kind": "send", "details": {}}, "s1", "sent", {"smtp_code": 250})
    work = SendsCommit([claim], BatchRecords([(1, records)]), [finish], [planned], False, now)
    for value in (
        claim,
        finish,
        ClaimResult(True, "failed", "s0", None, True),
        records,
        planned,
        work,
    ):
        assert type(value).__reduce__(value)[0] is type(value)
        assert pickle.loads(pickle.dumps(value)) == value


def test_plain_pickle_refuses_fields_it_could_not_give_back() -> None:
    @dataclasses.dataclass
    class Derived:
        a: int
        b: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="not __init__ arguments"):
        plain_pickle(Derived)
