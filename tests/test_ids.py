"""Time-ordered identifiers (UUIDv7) for audit events and sends."""

from __future__ import annotations

import time
import uuid

from factories import CAMPAIGN, b2b
from test_mailer import make_mailer

from prospect_mailer.ids import new_id
from prospect_mailer.store import Store
from prospect_mailer.transport import MemoryTransport


def test_an_id_is_a_version_7_uuid_in_32_hex_digits() -> None:
    value = new_id()
    assert len(value) == 32
    assert value == value.lower()
    parsed = uuid.UUID(hex=value)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert parsed.hex == value


def test_the_first_48_bits_are_the_creation_time_in_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(value[:12], 16) <= after


def test_ids_of_later_milliseconds_sort_after_and_none_repeat() -> None:
    first = [new_id() for _ in range(2000)]
    time.sleep(0.002)
    later = new_id()
    assert all(earlier < later for earlier in first)
    # 74 random bits within one millisecond: no two ids alike.
    many = first + [new_id() for _ in range(50_000)]
    assert len(set(many)) == len(many)
    # The random part is not constant: both halves vary.
    assert len({v[13:16] for v in many}) > 100
    assert len({v[17:] for v in many}) == len(many)


async def test_records_and_sends_get_time_ordered_ids(db: Store) -> None:
    mailer = make_mailer(db, MemoryTransport())
    for i in range(3):
        outcome = await mailer.send(b2b(f"p{i}@corp.example"), CAMPAIGN)
        assert outcome.status == "sent", outcome
    await mailer.close()
    records = await db.audit.events(campaign_id=CAMPAIGN.id)
    assert len(records) == 6  # pending and sent, for each send
    for r in records:
        assert uuid.UUID(hex=r.event_id).version == 7
        assert r.send_id is not None
        assert uuid.UUID(hex=r.send_id).version == 7
    stamps = [int(r.event_id[:12], 16) for r in records]  # records come in seq order
    assert stamps == sorted(stamps)
