"""Send claims: the (campaign, step, recipient) idempotency key, decided by the database."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from store_fixtures import OpenStore

from prospect_mailer.errors import InvalidInputError
from prospect_mailer.store import ClaimResult, ClaimStatus, Store

R1 = hashlib.sha256(b"one@example.com").hexdigest()
R2 = hashlib.sha256(b"two@example.com").hexdigest()
R3 = hashlib.sha256(b"three@example.com").hexdigest()
KEY: dict[str, Any] = {"campaign_id": "spring", "step": 1, "recipient_hash": R1}


async def _claim(store: Store, sid: str, **changes: Any) -> ClaimResult:
    options = {**KEY, "advertiser_id": "acme", "send_id": sid, **changes}
    return await store.claims.claim(**options)


async def test_claim_then_duplicate(store: Store) -> None:
    assert await _claim(store, "s1") == ClaimResult(claimed=True)
    again = await _claim(store, "s2")
    assert again == ClaimResult(claimed=False, existing_status="pending", existing_send_id="s1")
    assert await store.claims.finish(**KEY, send_id="s1", status="sent", message_id="<m1@x>")
    done = await _claim(store, "s3")
    assert (done.claimed, done.existing_status, done.existing_message_id) == (
        False,
        "sent",
        "<m1@x>",
    )
    # Another step or campaign is another key: a follow-up is not a duplicate.
    assert (await _claim(store, "s4", step=2)).claimed
    assert (await _claim(store, "s5", campaign_id="autumn")).claimed


async def test_finish_requires_the_claim_holder(store: Store) -> None:
    await _claim(store, "s1")
    assert not await store.claims.finish(**KEY, send_id="intruder", status="sent")
    assert await store.claims.statuses("spring", 1, [R1]) == {R1: "pending"}
    assert not await store.claims.finish(
        campaign_id="spring", step=1, recipient_hash=R2, send_id="s1", status="sent"
    )
    with pytest.raises(InvalidInputError, match="status"):
        await store.claims.finish(**KEY, send_id="s1", status="done")  # type: ignore[arg-type]


@pytest.mark.parametrize("status", ["failed", "deferred"])
async def test_retryable_claims_are_taken_over(store: Store, status: ClaimStatus) -> None:
    await _claim(store, "s1")
    await store.claims.finish(**KEY, send_id="s1", status=status)
    retry = await _claim(store, "s2")
    assert retry == ClaimResult(
        claimed=True, existing_status=status, existing_send_id="s1", taken_over=True
    )
    assert not await store.claims.finish(**KEY, send_id="s1", status="sent")  # s1 lost it
    assert await store.claims.finish(**KEY, send_id="s2", status="sent", message_id="<m2@x>")
    assert await store.claims.statuses("spring", 1, [R1]) == {R1: "sent"}


@pytest.mark.parametrize("status", ["blocked", "sent", "pending"])
async def test_force_takes_over_any_claim(store: Store, status: ClaimStatus) -> None:
    await _claim(store, "s1")
    await store.claims.finish(**KEY, send_id="s1", status=status)
    assert not (await _claim(store, "s2")).claimed
    forced = await _claim(store, "s3", force=True)
    assert (forced.claimed, forced.taken_over, forced.existing_status) == (True, True, status)


async def test_prior_contacts_and_statuses_in_one_query_each(store: Store) -> None:
    await _claim(store, "a", campaign_id="c1", recipient_hash=R1)
    await store.claims.finish(
        campaign_id="c1", step=1, recipient_hash=R1, send_id="a", status="sent"
    )
    await _claim(store, "b", campaign_id="c2", recipient_hash=R2)  # pending counts
    await _claim(store, "c", campaign_id="c2", recipient_hash=R3)
    await store.claims.finish(
        campaign_id="c2", step=1, recipient_hash=R3, send_id="c", status="failed"
    )
    await _claim(store, "d", campaign_id="c3", recipient_hash=R3, advertiser_id="globex")
    await store.claims.finish(
        campaign_id="c3", step=1, recipient_hash=R3, send_id="d", status="sent"
    )
    assert await store.claims.prior_contacts("acme", [R1, R2, R3, R1]) == {R1, R2}
    assert await store.claims.prior_contacts("globex", [R1, R2, R3]) == {R3}
    assert await store.claims.prior_contacts("acme", []) == set()
    assert await store.claims.statuses("c2", 1, [R1, R2, R3]) == {R2: "pending", R3: "failed"}
    many = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)] + [R2]
    assert await store.claims.statuses("c2", 1, many) == {R2: "pending"}


@pytest.mark.parametrize(
    "changes",
    [
        {"recipient_hash": "one@example.com"},
        {"step": 0},
        {"step": True},
        {"campaign_id": ""},
        {"send_id": ""},
        {"advertiser_id": "x\n"},
    ],
)
async def test_invalid_claims_are_refused(store: Store, changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        await _claim(store, "s1", **changes)


async def test_concurrent_claimers_on_two_stores_one_wins(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    results = await asyncio.gather(
        *(_claim(first if i % 2 else second, f"s{i}") for i in range(20))
    )
    winners = [r for r in results if r.claimed]
    assert len(winners) == 1
    holder = (await first.claims.statuses("spring", 1, [R1]), winners)
    assert holder[0] == {R1: "pending"}
    assert {r.existing_status for r in results if not r.claimed} == {"pending"}


async def test_concurrent_retries_one_wins(open_store: OpenStore) -> None:
    first, second = await open_store(), await open_store()
    await _claim(first, "s0")
    await first.claims.finish(**KEY, send_id="s0", status="failed")
    results = await asyncio.gather(
        *(_claim(first if i % 2 else second, f"s{i}") for i in range(1, 21))
    )
    winners = [r for r in results if r.claimed]
    assert len(winners) == 1
    assert (winners[0].existing_send_id, winners[0].taken_over) == ("s0", True)
    assert {r.existing_status for r in results if not r.claimed} == {"pending"}


async def test_concurrent_forced_claims_never_share_a_takeover(open_store: OpenStore) -> None:
    """``force`` takes over whatever it finds, so forced claimers may win one after another,
    but no two of them ever take over the same claim (each winner replaced a distinct holder).
    """
    first, second = await open_store(), await open_store()
    await _claim(first, "s0")
    results = await asyncio.gather(
        *(_claim(first if i % 2 else second, f"s{i}", force=True) for i in range(1, 21))
    )
    winners = [r for r in results if r.claimed]
    replaced = [r.existing_send_id for r in winners]
    assert winners
    assert len(set(replaced)) == len(replaced)
    assert "s0" in replaced


async def test_claim_and_record_writes_claims_and_their_records(store: Store) -> None:
    from prospect_mailer.store import AuditEvent, ClaimRequest

    def request(sid: str) -> ClaimRequest:
        return ClaimRequest(**KEY, advertiser_id="acme", send_id=sid)

    def record(results: list[ClaimResult]) -> list[AuditEvent]:
        return [
            AuditEvent(
                kind="send",
                status="pending" if r.claimed else "duplicate",
                send_id=sid,
                campaign_id="spring",
                recipient_hash=R1,
            )
            for sid, r in zip(("s1", "s2"), results, strict=True)
        ]

    results, records = await store.claim_and_record([request("s1"), request("s2")], record)
    assert [r.claimed for r in results] == [True, False]
    assert [(r.send_id, r.status) for r in records] == [("s1", "pending"), ("s2", "duplicate")]
    assert await store.claims.statuses("spring", 1, [R1]) == {R1: "pending"}
    assert (await store.audit.verify()).ok
