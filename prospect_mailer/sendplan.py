"""The records a send carries through the pipeline, and the group commit of its results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Generic, TypeVar

from . import policy
from .addresses import NormalisedAddress
from .compose import RawMessage
from .models import Campaign, Decision, Outcome, Prospect
from .store import AuditEvent, ClaimStatus, FinishRequest, SuppressionHit
from .store.pickling import plain_pickle

__all__ = [
    "Item",
    "Options",
    "Plan",
    "PlannedEvent",
    "SendCommits",
    "audit_base",
    "chunks",
    "failed_outcome",
    "suppression_match",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Options:
    force: bool = False
    dry_run: bool = False
    # The caller's message (relay) instead of the campaign's templates.
    message: EmailMessage | RawMessage | None = None
    message_key: str = ""
    big: bool = False  # compose and serialise off the event loop (a large caller's message)
    # A dry run reports a recipient already sent (or pending) as a duplicate; without it (the
    # relay's RCPT check, which accepts both alike) the claim statuses are not read.
    duplicates: bool = True
    # A dry run whose recipient this pipeline is about to send (the relay's RCPT check, before
    # DATA): its decision is kept for that send, which takes it if nothing changed meanwhile.
    keep_decision: bool = False


@dataclass(frozen=True, slots=True)
class Item:
    prospect: Prospect
    address: NormalisedAddress
    facts: policy.Facts
    claim_status: str | None = None  # only looked up for dry runs


@dataclass(eq=False)
class Plan:
    """One allowed or blocked recipient of a chunk, as it moves through the pipeline."""

    item: Item
    decision: Decision
    send_id: str
    base: dict[str, Any]
    message: EmailMessage | bytes | None = None
    message_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    final: Outcome | None = None

    def event(
        self, status: str, *, rule_ids: Sequence[str] = (), extra: dict[str, Any] | None = None
    ) -> AuditEvent:
        return plan_event(self.base, self.send_id, status, rule_ids=rule_ids, extra=extra)

    def planned(self, status: str, *, extra: dict[str, Any] | None = None) -> PlannedEvent:
        """:meth:`event`, built where it is written (see :class:`PlannedEvent`)."""
        return PlannedEvent(self.base, self.send_id, status, extra)

    def finish_request(
        self, campaign: Campaign, options: Options, status: ClaimStatus
    ) -> FinishRequest:
        return FinishRequest(
            campaign_id=campaign.id,
            step=campaign.step,
            recipient_hash=self.item.address.key_hash,
            send_id=self.send_id,
            status=status,
            message_id=self.message_id,
            message_key=options.message_key,
        )


def plan_event(
    base: dict[str, Any],
    send_id: str,
    status: str,
    *,
    rule_ids: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> AuditEvent:
    """The record of one send: its audit ``base`` (see ``audit_base``) with ``status``, its
    ``rule_ids``, and ``extra`` facts (those not None) added to the details."""
    details = dict(base["details"])
    if extra:
        details.update({k: v for k, v in extra.items() if v is not None})
    fields = {k: v for k, v in base.items() if k != "details"}
    return AuditEvent(
        **fields, send_id=send_id, status=status, rule_ids=tuple(rule_ids), details=details
    )


@plain_pickle
@dataclass(frozen=True, slots=True)
class PlannedEvent:
    """A send's result record as :func:`plan_event`'s arguments; called, the record.

    What a send submits once the transport answered: the group commit builds it where it
    writes it (``Store.commit_sends``), so with a writer process the record's fields are
    copied and checked there, off the event loop that serves the relay's sessions; a record
    that fails its checks fails the results' part of that commit as a built one would. Its
    pickle is plain data (the audit base's dicts, strings), cheaper than a built record's.
    """

    base: dict[str, Any]
    send_id: str
    status: str
    extra: dict[str, Any] | None = None

    def __call__(self) -> AuditEvent:
        return plan_event(self.base, self.send_id, self.status, extra=self.extra)


def failed_outcome(p: Plan, detail: str) -> Outcome:
    return Outcome(email=p.item.prospect.email, status="failed", send_id=p.send_id, detail=detail)


Claim = TypeVar("Claim")
ClaimRes = TypeVar("ClaimRes")
#: ``commit(claims, results) -> (per-claim results or the claims' error, the results' error)``
SendCommit = Callable[
    [list[Claim], list[tuple[FinishRequest, AuditEvent | PlannedEvent]]],
    Awaitable[tuple[Sequence[ClaimRes] | Exception, Exception | None]],
]


class SendCommits(Generic[Claim, ClaimRes]):
    """Group commit of claims and send results together: whatever concurrent sends submit
    while one commit runs (claims before sending, results after) goes into the next single
    call of ``commit`` (on a SQLite file: one transaction, one ``fsync``, for both kinds).

    Each caller resumes only once its own items are durable. A batch's claims and results
    can fail apart (see :meth:`~prospect_mailer.store.Store.commit_sends`); an error reaches
    every caller of the kind that failed. The database still decides everything.
    """

    def __init__(self, commit: SendCommit[Claim, ClaimRes]) -> None:
        self._commit = commit
        self._claims: list[tuple[Claim, asyncio.Future[ClaimRes]]] = []
        self._results: list[
            tuple[tuple[FinishRequest, AuditEvent | PlannedEvent], asyncio.Future[None]]
        ] = []
        self._task: asyncio.Task[None] | None = None

    async def claim(self, item: Claim) -> ClaimRes:
        """Commit ``item`` (a chunk's claims) with whatever else is queued; its result."""
        future: asyncio.Future[ClaimRes] = asyncio.get_running_loop().create_future()
        self._claims.append((item, future))
        return await self._wait(future)

    async def submit(self, request: FinishRequest, event: AuditEvent | PlannedEvent) -> None:
        """Record one send's result; returns once it is durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results.append(((request, event), future))
        await self._wait(future)

    async def _wait(self, future: asyncio.Future[T]) -> T:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())
        # Not shielded: each caller waits on a future of its own, which a cancelled caller
        # cancels and ``_drain`` then skips; the commit and the other callers go on (the
        # drain is a task of its own). A shield adds a future and a turn of the event loop
        # to every wait; through the relay (2 KB, 10 sessions, six alternating pairs of
        # ``bench.relay_ab``) its removal measured 458 -> 561 msgs/s once and 482 -> 477 the
        # next time: no effect beyond this VM's noise, one mechanism less.
        return await future

    async def _drain(self) -> None:
        while self._claims or self._results:
            claims, self._claims = self._claims, []
            results, self._results = self._results, []
            claimed: Sequence[ClaimRes] | Exception
            failed: Exception | None
            try:
                claimed, failed = await self._commit(
                    [c for c, _ in claims], [r for r, _ in results]
                )
            except Exception as exc:
                claimed, failed = exc, exc
            if not isinstance(claimed, Exception) and len(claimed) != len(claims):
                claimed = RuntimeError(
                    f"group commit returned {len(claimed)} claim results for {len(claims)}"
                )
            for at, (_, f) in enumerate(claims):
                if not f.done():
                    if isinstance(claimed, Exception):
                        f.set_exception(claimed)
                    else:
                        f.set_result(claimed[at])
            for _, g in results:
                if not g.done():
                    if failed is not None:
                        g.set_exception(failed)
                    else:
                        g.set_result(None)


def suppression_match(hit: SuppressionHit) -> policy.SuppressionMatch:
    return policy.SuppressionMatch(
        kind=hit.kind, scope=hit.scope, scope_value=hit.scope_value, reason=hit.reason
    )


def audit_base(
    item: Item, campaign: Campaign, decision: Decision, *, transport_label: str, transport: object
) -> dict[str, Any]:
    """The audit fields of RULES.md section G that are known once the decision is made."""
    p = item.prospect
    return {
        "kind": "send",
        "campaign_id": campaign.id,
        "step": campaign.step,
        "advertiser_id": campaign.advertiser.id,
        "purpose": campaign.purpose,
        "recipient_hash": item.address.key_hash,
        "recipient_masked": item.address.masked,
        "transport": transport_label,
        "details": {
            "profiles": list(campaign.profiles),
            "recipient_type": decision.effective_recipient_type,
            "declared_recipient_type": p.recipient_type,
            "classifier_version": item.facts.classifier_version,
            "legal_basis": p.legal_basis,
            "consent_ref": p.consent_ref,
            "source_type": p.source_type,
            "source_name": p.source_name,
            "first_contact": decision.first_contact,
            "suppression_hits": len(item.facts.suppression),
            "rules": {r.rule_id: r.outcome for r in decision.results},
            "warnings": [f"{w.rule_id}: {w.reason}" for w in decision.warnings],
            "transport_kind": getattr(transport, "name", type(transport).__name__),
        },
    }


async def chunks(
    source: Iterable[Prospect] | AsyncIterable[Prospect], size: int
) -> AsyncIterator[list[Prospect]]:
    """Group a sync or async stream into lists of ``size`` without reading ahead further."""
    chunk: list[Prospect] = []
    if isinstance(source, AsyncIterable):
        async for p in source:
            chunk.append(p)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    else:
        for p in source:
            chunk.append(p)
            if len(chunk) >= size:
                yield chunk
                chunk = []
                await asyncio.sleep(0)  # let other tasks run between chunks of a sync iterable
    if chunk:
        yield chunk
