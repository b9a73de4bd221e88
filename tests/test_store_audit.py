"""Audit log: hash chain, tamper detection, queries, concurrent appends, group commit."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from store_fixtures import OpenStore

from prospect_mailer.errors import InvalidInputError, StoreError
from prospect_mailer.store import GENESIS_HASH, AuditEvent, Store, chain_hash
from prospect_mailer.store.audit_records import HASHED_FIELDS

RECIPIENT = hashlib.sha256(b"jane@example.com").hexdigest()
T0 = datetime(2025, 3, 1, 9, 0, 0, 123456, tzinfo=UTC)


def _event(i: int, **changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "kind": "send",
        "status": "sent" if i % 3 else "blocked",
        "send_id": f"send-{i}",
        "campaign_id": "spring" if i % 2 else "autumn",
        "step": 1,
        "advertiser_id": "acme",
        "purpose": "prospecting",
        "recipient_hash": RECIPIENT,
        "recipient_masked": "j***@example.com",
        "message_id": f"<{i}@mail.acme.example>",
        "transport": "library",
        "rule_ids": ("FR_B2C_CONSENT_REQUIRED",) if i % 3 == 0 else (),
        "details": {"first_contact": i == 1, "legal_basis": "consent", "n": i},
        "created_at": T0 + timedelta(minutes=i),
        **changes,
    }
    return AuditEvent(**fields)  # type: ignore[arg-type]


async def _fill(store: Store, n: int) -> None:
    await store.audit.append([_event(i) for i in range(1, n + 1)])


async def _sql(store: Store, *statements: str) -> None:
    async with store.engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_append_builds_the_chain(store: Store) -> None:
    records = await store.audit.append([_event(1), _event(2)])
    records += await store.audit.append([_event(3)])
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS_HASH
    assert records[1].prev_hash == records[0].hash
    assert records[2].prev_hash == records[1].hash
    assert await store.audit.head() == (3, records[2].hash)
    first = records[0]
    assert first.created_at == T0 + timedelta(minutes=1)
    assert first.details == {"first_contact": True, "legal_basis": "consent", "n": 1}
    assert len(first.event_id) == 32
    # The hash is sha256(prev_hash + canonical JSON of every other field), as stored.
    stored = (await store.audit.events(send_id="send-1"))[0]
    assert stored == first
    payload = {
        "seq": 1, "event_id": first.event_id, "send_id": "send-1",
        "created_at": "2025-03-01T09:01:00.123456+00:00", "kind": "send", "status": "sent",
        "campaign_id": "spring", "step": 1, "advertiser_id": "acme", "purpose": "prospecting",
        "recipient_hash": RECIPIENT, "recipient_masked": "j***@example.com",
        "message_id": "<1@mail.acme.example>", "transport": "library", "rule_ids": "",
        "details": '{"first_contact":true,"legal_basis":"consent","n":1}',
    }  # fmt: skip
    assert set(payload) == set(HASHED_FIELDS)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first.hash == hashlib.sha256((GENESIS_HASH + canonical).encode()).hexdigest()
    assert first.hash == chain_hash(GENESIS_HASH, payload)
    assert (await store.audit.verify()).ok
    assert await store.audit.append([]) == []


async def test_rule_ids_and_unicode_round_trip(store: Store) -> None:
    (record,) = await store.audit.append(
        [_event(3, details={"source_name": "Salon Éco 2025 ✓"}, created_at=None)]
    )
    (again,) = await store.audit.events(send_id="send-3")
    assert again.rule_ids == ("FR_B2C_CONSENT_REQUIRED",)
    assert again.details == {"source_name": "Salon Éco 2025 ✓"}
    assert abs(again.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert again == record


async def test_details_never_hold_addresses_or_bodies(store: Store) -> None:
    (record,) = await store.audit.append(
        [
            _event(
                1,
                details={
                    "smtp_reply": "550 5.1.1 <jane.doe@example.com>: Recipient address rejected",
                    "nested": [{"note": "cc: Bob.Smith@Corp.example.org"}],
                    "idn": "to jäne@exämple.fr",
                    "in_reply_to_message_id": "<abc@mail.example>",
                },
            )
        ]
    )
    assert (
        record.details["smtp_reply"] == "550 5.1.1 <j***@example.com>: Recipient address rejected"
    )
    assert record.details["nested"] == [{"note": "cc: B***@Corp.example.org"}]
    assert record.details["idn"] == "to j***@exämple.fr"
    assert record.details["in_reply_to_message_id"] == "<abc@mail.example>"
    for key in ("body", "email", "Address", "html", "token", "password"):
        with pytest.raises(InvalidInputError, match="may not contain"):
            await store.audit.append([_event(2, details={"x": {key: "..."}})])
    with pytest.raises(InvalidInputError, match="JSON"):
        await store.audit.append([_event(2, details={"x": object()})])
    with pytest.raises(InvalidInputError, match="64 KiB"):
        await store.audit.append([_event(2, details={"x": "y" * 70_000})])
    assert await store.audit.count() == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "Send!"},
        {"status": ""},
        {"recipient_hash": "jane@example.com"},
        {"recipient_masked": "jane@example.com"},
        {"rule_ids": ("A,B",)},
        {"step": 0},
    ],
)
def test_invalid_events_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        _event(1, **changes)


async def test_verify_empty_and_chunked(store: Store) -> None:
    result = await store.audit.verify()
    assert (result.ok, result.count, result.first_bad_seq) == (True, 0, None)
    await _fill(store, 25)
    result = await store.audit.verify(chunk_size=7)
    assert (result.ok, result.count, result.first_bad_seq) == (True, 25, None)


@pytest.mark.parametrize(
    ("statements", "bad_seq", "reason"),
    [
        (["UPDATE audit_events SET status = 'sent' WHERE seq = 6"], 6, "altered"),
        (["UPDATE audit_events SET details = '{}' WHERE seq = 9"], 9, "altered"),
        (["UPDATE audit_events SET created_at = '2020-01-01T00:00:00.000000+00:00' WHERE seq = 1"], 1, "altered"),  # noqa: E501
        (["DELETE FROM audit_events WHERE seq = 4"], 4, "missing"),
        (["DELETE FROM audit_events WHERE seq = 1"], 1, "missing"),
        (
            [
                "UPDATE audit_events SET seq = -1 WHERE seq = 3",
                "UPDATE audit_events SET seq = 3 WHERE seq = 4",
                "UPDATE audit_events SET seq = 4 WHERE seq = -1",
            ],
            3,
            "does not chain",
        ),
        (["DELETE FROM audit_events WHERE seq >= 11"], 11, "tail removed"),
        (["UPDATE audit_head SET hash = prev_hash_placeholder"], 12, "does not match the chain head"),  # noqa: E501
        (["UPDATE audit_head SET seq = 10"], 11, "past the head"),
    ],
    ids=[
        "edit-status", "edit-details", "edit-time", "delete-middle", "delete-first", "swap",
        "truncate-tail", "head-hash", "rows-past-head",
    ],
)  # fmt: skip
async def test_verify_names_the_first_bad_record(
    store: Store, statements: list[str], bad_seq: int, reason: str
) -> None:
    await _fill(store, 12)
    statements = [
        s.replace("prev_hash_placeholder", f"'{'f' * 64}'") for s in statements
    ]  # a wrong head hash
    await _sql(store, *statements)
    result = await store.audit.verify(chunk_size=5)
    assert not result.ok
    assert result.first_bad_seq == bad_seq, result.reason
    assert reason in result.reason


async def test_edit_with_recomputed_hash_breaks_the_next_link(store: Store) -> None:
    await _fill(store, 5)
    (rec,) = await store.audit.events(send_id="send-2")
    fields = {name: getattr(rec, name) for name in HASHED_FIELDS if hasattr(rec, name)}
    fields.update(
        created_at="2025-03-01T09:02:00.123456+00:00",
        rule_ids="",
        details=rec.details_json,
        status="blocked",
    )
    forged = chain_hash(rec.prev_hash, fields)
    await _sql(
        store, f"UPDATE audit_events SET status = 'blocked', hash = '{forged}' WHERE seq = 2"
    )
    result = await store.audit.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_event_queries(store: Store) -> None:
    await _fill(store, 10)
    assert [r.seq for r in await store.audit.events(campaign_id="spring")] == [1, 3, 5, 7, 9]
    assert [r.seq for r in await store.audit.events(status="blocked")] == [3, 6, 9]
    assert [r.seq for r in await store.audit.events(send_id="send-4")] == [4]
    assert len(await store.audit.events(recipient_hash=RECIPIENT)) == 10
    assert await store.audit.events(recipient_hash="0" * 64) == []
    window = await store.audit.events(
        since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=6)
    )
    assert [r.seq for r in window] == [3, 4, 5]
    naive = await store.audit.events(since=(T0 + timedelta(minutes=9)).replace(tzinfo=None))
    assert [r.seq for r in naive] == [9, 10]
    assert [r.seq for r in await store.audit.events(limit=2)] == [1, 2]
    streamed = [r.seq async for r in store.audit.iter_events(chunk_size=3)]
    assert streamed == list(range(1, 11))
    streamed = [r.seq async for r in store.audit.iter_events(status="sent", chunk_size=2)]
    assert streamed == [1, 2, 4, 5, 7, 8, 10]
    assert await store.audit.count() == 10


async def test_concurrent_appends_from_two_stores(open_store: OpenStore) -> None:
    """Two engines (as two processes) append concurrently: one gap-free, valid chain."""
    first, second = await open_store(), await open_store()

    async def worker(store: Store, w: int) -> None:
        for i in range(5):
            await store.audit.append([_event(w * 100 + i, created_at=None)] * (1 + (i % 3)))

    await asyncio.gather(*(worker(first if w % 2 else second, w) for w in range(16)))
    expected = 16 * (1 + 2 + 3 + 1 + 2)
    result = await first.audit.verify(chunk_size=50)
    assert result.ok, result.reason
    assert result.count == expected
    seqs = [r.seq async for r in second.audit.iter_events()]
    assert seqs == list(range(1, expected + 1))
    assert await second.audit.head() == (expected, (await second.audit.events())[-1].hash)


async def test_writer_groups_concurrent_writes(store: Store) -> None:
    async with store.audit.writer(max_batch=64) as writer:
        records = await asyncio.gather(*(writer.write(_event(i)) for i in range(1, 201)))
    assert sorted(r.seq for r in records) == list(range(1, 201))
    assert [r.send_id for r in records] == [f"send-{i}" for i in range(1, 201)]
    assert writer.batches < 20  # grouped: 200 events, batches of up to 64
    assert (await store.audit.verify()).ok
    with pytest.raises(StoreError, match="not running"):
        await writer.write(_event(1))


async def test_writer_flushes_on_close(store: Store) -> None:
    writer = store.audit.writer()
    writer.start()
    tasks = [asyncio.create_task(writer.write(_event(i))) for i in range(1, 31)]
    await asyncio.sleep(0)  # every task has queued its event
    await writer.close()
    assert all(t.done() for t in tasks)
    assert sorted(t.result().seq for t in tasks) == list(range(1, 31))
    assert await store.audit.count() == 30
    await writer.close()  # idempotent
    with pytest.raises(StoreError):
        writer.start()


async def test_writer_bad_event_fails_only_its_caller(store: Store) -> None:
    async with store.audit.writer() as writer:
        good = asyncio.create_task(writer.write(_event(1)))
        with pytest.raises(InvalidInputError):
            await writer.write(_event(2, details={"body": "Hello"}))
        assert (await good).seq == 1


async def test_writer_store_failure_reaches_every_waiter(store: Store) -> None:
    await _sql(store, "DROP TABLE audit_head")
    async with store.audit.writer() as writer:
        results = await asyncio.gather(
            *(writer.write(_event(i)) for i in range(1, 11)), return_exceptions=True
        )
        assert all(isinstance(r, StoreError) for r in results)
        assert len({id(r) for r in results}) == 10
        # The writer keeps running: the next batch is tried afresh.
        with pytest.raises(StoreError, match="audit"):
            await writer.write(_event(11))
