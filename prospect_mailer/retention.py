"""The retention purge: FR_PROSPECT_RETENTION_3Y applied to the prospect registry.

A prospect whose data is past retention (:func:`prospect_mailer.policy.retention_status`, the
very function the send-time rule uses) is removed from the registry in this order, so that a
failure at any point leaves the safe state (RULES.md SUPP_SURVIVES_DELETION):

1. a **global suppression entry** for its address hash is written (or kept if one exists):
   reason ``manual``, source ``retention-purge`` (the store's reasons have no ``retention``;
   ``manual`` with that source is the least surprising fit and is how exports show it). A
   re-import of the address is then flagged at import and blocked at send;
2. an audit record ``kind=purge, status=purged`` names the rule, the reference date and the
   expiry (never the address: its hash and masked form);
3. the profile is deleted.

Prospects with no date at all (retention cannot be computed) and current customers are kept
and counted: deleting data on a guess is not this tool's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from .models import Prospect
from .policy import retention_status
from .store import AuditEvent, Store

__all__ = ["PURGE_SOURCE", "RETENTION_RULE", "PurgeCandidate", "PurgeReport", "purge_expired"]

RETENTION_RULE = "FR_PROSPECT_RETENTION_3Y"
#: ``source`` of the suppression entries a purge writes.
PURGE_SOURCE = "retention-purge"


@dataclass(frozen=True, slots=True)
class PurgeCandidate:
    """A registered prospect past retention.

    Attributes:
        email: the address as registered (for the operator's list; never logged).
        recipient_hash: its key hash.
        reference: the last of collection, own contact and end of customer relationship.
        expires_at: ``reference`` plus three years.
    """

    email: str
    recipient_hash: str
    reference: datetime
    expires_at: datetime


@dataclass
class PurgeReport:
    """What :func:`purge_expired` found and did.

    Attributes:
        examined: registered prospects looked at.
        expired: of them, past retention (purged unless ``dry_run``).
        purged: profiles deleted.
        current_customers: kept (no expiry runs while the relationship lasts).
        undated: kept because no date lets retention be computed (fix the data).
        dry_run: nothing was changed.
    """

    examined: int = 0
    expired: int = 0
    purged: int = 0
    current_customers: int = 0
    undated: int = 0
    dry_run: bool = False
    candidates: list[PurgeCandidate] = field(default_factory=list)


async def purge_expired(
    store: Store,
    *,
    now: datetime,
    dry_run: bool = False,
    chunk_size: int = 500,
    max_listed: int = 1000,
    on_candidate: Callable[[PurgeCandidate], None] | None = None,
) -> PurgeReport:
    """Find, and unless ``dry_run`` purge, the registered prospects past retention.

    Args:
        store: the opened store.
        now: the current time (timezone-aware).
        dry_run: only list; nothing is written or deleted.
        chunk_size: prospects suppressed, audited and deleted per batch.
        max_listed: how many candidates to keep in the report.
        on_candidate: called for every candidate (to stream a list of any length).

    Raises:
        ValueError: ``now`` is naive.
        StoreError: the database failed; re-run: every step is idempotent.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    report = PurgeReport(dry_run=dry_run)
    batch: list[tuple[PurgeCandidate, Prospect]] = []

    async def flush() -> None:
        if dry_run or not batch:
            batch.clear()
            return
        hashes = [c.recipient_hash for c, _ in batch]
        await store.suppression.add_hashes(
            hashes,
            kind="address",
            scope="global",
            scope_value="",
            reason="manual",
            source=PURGE_SOURCE,
        )
        await store.audit.append(
            [
                AuditEvent(
                    kind="purge",
                    status="purged",
                    recipient_hash=c.recipient_hash,
                    recipient_masked=p.address.masked,
                    transport="cli",
                    rule_ids=(RETENTION_RULE,),
                    details={
                        "reference": c.reference,
                        "expired_at": c.expires_at,
                        "suppression": {"scope": "global", "source": PURGE_SOURCE},
                    },
                )
                for c, p in batch
            ]
        )
        report.purged += await store.prospects.delete_many(hashes)
        batch.clear()

    async for key, prospect in store.prospects.iter_all(chunk_size=chunk_size):
        report.examined += 1
        status = retention_status(prospect, now)
        if status.current_customer:
            report.current_customers += 1
            continue
        if status.reference is None or status.expires_at is None:
            report.undated += 1
            continue
        if not status.expired:
            continue
        candidate = PurgeCandidate(prospect.email, key, status.reference, status.expires_at)
        report.expired += 1
        if len(report.candidates) < max_listed:
            report.candidates.append(candidate)
        if on_candidate is not None:
            on_candidate(candidate)
        batch.append((candidate, prospect))
        if len(batch) >= chunk_size:
            await flush()
    await flush()
    return report
