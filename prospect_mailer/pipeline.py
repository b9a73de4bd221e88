"""The send pipeline (DESIGN.md "The pipeline"), chunk by chunk.

For each chunk of recipients: one suppression query, one prior-contact query and one claim
status query, the pure policy for each, the messages of the allowed sends composed, then one
transaction claiming them and appending every record of the chunk (blocks, duplicates,
``pending``, composition failures) to the audit log (on PostgreSQL: claims, then records);
then the sends, with bounded concurrency, whose results are group-committed (claim and audit)
before each outcome is reported. Concurrent chunks (the relay's sessions, several
``send_many``) share those transactions, claims and results together: one transaction (one
``fsync``) on SQLite for whatever both kinds queued meanwhile (``SendCommits``,
``Store.commit_sends``). Through the relay, 2 KB messages and 10 sessions, that is about 40%
fewer transactions (1,250-1,400 against 2,170-2,510 for 3,300 messages).

Fail closed: if the store cannot be read, nothing is sent (``failed``); if the transport fails,
the outcome is ``deferred`` (temporary) or ``failed`` (permanent), never ``sent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Literal

from jinja2 import TemplateError

from . import policy
from .addresses import RoleClassifier, lookup_keys
from .compose import Composer
from .errors import (
    ConfigError,
    InvalidInputError,
    StoreError,
    TransportError,
    TransportPermanentError,
)
from .ids import new_id
from .models import Campaign, Decision, Outcome, Prospect, trusted
from .sendplan import (
    Item,
    Options,
    Plan,
    PlannedEvent,
    SendCommits,
    audit_base,
    chunks,
    failed_outcome,
    plan_event,
    suppression_match,
)
from .store import (
    AuditEvent,
    ClaimRequest,
    ClaimResult,
    FinishRequest,
    Store,
)
from .store.pickling import plain_pickle
from .transport import Transport

__all__ = ["Options", "Pipeline"]

log = logging.getLogger("prospect_mailer")


#: An allowed dry run's outcome but its address and detail (see :meth:`Pipeline.dry_run`),
#: and the fields that ``Outcome(email=..., status="allowed", detail=...)`` records as set.
_ALLOWED_SET = frozenset({"email", "status", "detail"})
_ALLOWED: dict[str, Any] = {
    "status": "allowed",
    "rule_ids": (),
    "send_id": None,
    "message_id": None,
    "smtp_code": None,
    "smtp_reply": "",
}


class Pipeline:
    """Runs sends through facts, policy, claims, composition, transport and audit.

    :class:`~prospect_mailer.mailer.ProspectMailer` is the public face; this holds the work.
    """

    def __init__(
        self,
        *,
        store: Store,
        transport: Transport,
        composer: Composer,
        classifier: RoleClassifier,
        clock: Callable[[], datetime],
        transport_label: str,
        concurrency: int,
    ) -> None:
        self.store = store
        self.transport = transport
        self.composer = composer
        self.classifier = classifier
        self.clock = clock
        self.transport_label = transport_label
        self.concurrency = concurrency
        # Shared by every send of this pipeline, so concurrent sends (the relay's sessions,
        # several send_many calls) share transactions too.
        self._commits: SendCommits[ClaimBatch, list[ClaimResult]] = SendCommits(self._commit_sends)
        self._decisions: dict[tuple[int, int], _Decided] = {}

    async def run(
        self,
        prospects: Iterable[Prospect] | AsyncIterable[Prospect],
        campaign: Campaign,
        options: Options,
        concurrency: int | None,
        chunk_size: int,
    ) -> AsyncIterator[Outcome]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        limit = asyncio.Semaphore(concurrency or self.concurrency)
        async for chunk in chunks(prospects, chunk_size):
            async for outcome in self.chunk(chunk, campaign, options, limit):
                yield outcome

    async def gather_facts(
        self,
        chunk: Sequence[Prospect],
        campaign: Campaign,
        options: Options,
        *,
        statuses: bool = True,
    ) -> list[Item | Outcome]:
        """One suppression query and one prior-contact query for the whole chunk, and one of
        the claim statuses unless ``statuses`` is false."""
        addresses = [p.address for p in chunk]
        keys, domain_keys = lookup_keys(addresses)
        try:
            hits = await self.store.suppression.lookup(keys)
            hashes = sorted({a.key_hash for a in addresses})
            prior = await self.store.claims.prior_contacts(campaign.advertiser.id, hashes)
            # Dry run: what would be a duplicate. Real send: what need not be composed (the
            # claim, in the database, still decides).
            claimed: dict[str, str] = (
                dict(
                    await self.store.claims.statuses(
                        campaign.id, campaign.step, hashes, message_key=options.message_key
                    )
                )
                if statuses
                else {}
            )
        except StoreError as exc:
            # Fail closed: without the suppression list nothing may be sent.
            log.error("store unavailable, %d recipients not sent: %s", len(chunk), exc)
            await self.try_audit_store_failure(chunk, campaign, exc)
            return [
                Outcome(
                    email=p.email,
                    status="failed",
                    rule_ids=("SUPP_CHECK_AT_SEND",),
                    detail=f"store unavailable, not sent: {exc}",
                )
                for p in chunk
            ]
        items: list[Item | Outcome] = []
        for p, a in zip(chunk, addresses, strict=True):
            matches = [
                suppression_match(h)
                for k in (a.key_hash, *domain_keys[a.domain])
                for h in hits.get(k, ())
            ]
            facts = policy.Facts(
                suppression=tuple(matches),
                prior_contact=a.key_hash in prior,
                role_address=self.classifier.is_role(a),
                classifier_version=self.classifier.version,
            )
            items.append(
                Item(prospect=p, address=a, facts=facts, claim_status=claimed.get(a.key_hash))
            )
        return items

    def decide(
        self,
        prospect: Prospect,
        campaign: Campaign,
        facts: policy.Facts,
        now: datetime,
        *,
        keep: bool,
    ) -> Decision:
        """``policy.decide``, or the decision kept for it: the relay decides each recipient
        twice, at RCPT (a dry run that keeps its decision: ``keep``) and at DATA (the send, on
        facts read again).

        A kept decision is taken (once) for the same prospect and campaign objects, equal
        facts and a ``now`` from the one it was made at up to :func:`policy.stable_until` (the
        next date of the prospect's a rule compares the clock with), in the same time zone;
        else the rules run again. At most :data:`_DECISIONS_KEPT` are kept, the oldest
        dropped first (a client that never sends DATA).
        """
        key = (id(prospect), id(campaign))
        kept = self._decisions.pop(key, None)
        if (
            kept is not None
            and kept.prospect is prospect
            and kept.campaign is campaign
            and kept.facts == facts
            and kept.at <= now
            and (kept.until is None or now < kept.until)
            and now.utcoffset() == kept.at.utcoffset()
        ):
            return kept.decision
        decision = policy.decide(prospect, campaign, facts, now)
        until = policy.stable_until(prospect, now) if keep else now
        if until is None or until > now:
            if len(self._decisions) >= _DECISIONS_KEPT:
                del self._decisions[next(iter(self._decisions))]  # the oldest
            self._decisions[key] = _Decided(prospect, campaign, facts, now, until, decision)
        return decision

    def dry_run(self, item: Item, campaign: Campaign, options: Options) -> Outcome:
        p = item.prospect
        decision = self.decide(p, campaign, item.facts, self.clock(), keep=options.keep_decision)
        if not decision.allowed:
            return Outcome(
                email=p.email,
                status="blocked",
                rule_ids=decision.blocked_by,
                detail=policy.explain(decision),
            )
        if item.claim_status in ("pending", "sent") and not options.force:
            return Outcome(
                email=p.email,
                status="duplicate",
                detail=f"already {item.claim_status} for campaign {campaign.id} "
                f"step {campaign.step}; would not be sent again",
            )
        warnings = "; ".join(f"{w.rule_id}: {w.reason}" for w in decision.warnings)
        # The relay's every RCPT: not validated again (the address is the prospect's own,
        # the rest this module's), as Outcome(...) would give it.
        values = {"email": p.email, **_ALLOWED, "detail": warnings.strip()}
        return trusted(Outcome, values, _ALLOWED_SET)

    async def chunk(
        self,
        chunk: Sequence[Prospect],
        campaign: Campaign,
        options: Options,
        limit: asyncio.Semaphore,
    ) -> AsyncIterator[Outcome]:
        """One chunk: facts, decisions, messages, claims with their records, then sends.

        Database work is batched per chunk (three reads, one transaction for the claims and
        records); only the sends run one by one, with bounded concurrency, and their results
        are group-committed with other sends' (``SendCommits``).
        """
        slots: list[Outcome | asyncio.Future[Outcome]] = [
            asyncio.ensure_future(self.deliver(slot, campaign, options, limit))
            if isinstance(slot, Plan)
            else slot
            for slot in await self.prepare(chunk, campaign, options, statuses=True)
        ]
        try:
            for slot in slots:
                yield await slot if isinstance(slot, asyncio.Future) else slot
        finally:
            await _cancel_pending(slots)

    async def one(self, prospect: Prospect, campaign: Campaign, options: Options) -> Outcome:
        """:meth:`chunk` for one recipient (``ProspectMailer.send``, the relay's every send),
        without an async generator to set up and finalise nor a task for the send.

        The claim statuses are read only for a dry run that reports duplicates: for a real
        send of one recipient they would only spare composing a duplicate, which the claim
        refuses all the same.
        """
        (slot,) = await self.prepare(
            [prospect], campaign, options, statuses=options.dry_run and options.duplicates
        )
        if isinstance(slot, Plan):
            return await self.deliver(slot, campaign, options, None)
        return slot

    async def prepare(
        self,
        chunk: Sequence[Prospect],
        campaign: Campaign,
        options: Options,
        *,
        statuses: bool,
    ) -> list[Outcome | Plan]:
        """Everything up to the sends: per recipient, in order, its outcome or the claimed
        plan to deliver (``statuses``: see :meth:`gather_facts`)."""
        items = await self.gather_facts(chunk, campaign, options, statuses=statuses)
        if options.dry_run:
            return [
                item if isinstance(item, Outcome) else self.dry_run(item, campaign, options)
                for item in items
            ]
        now = self.clock()
        slots: list[Outcome | Plan] = []
        events: list[AuditEvent] = []
        allowed: list[Plan] = []
        for item in items:
            if isinstance(item, Outcome):
                slots.append(item)
                continue
            decision = self.decide(item.prospect, campaign, item.facts, now, keep=False)
            plan = Plan(
                item,
                decision,
                new_id(),
                audit_base(
                    item,
                    campaign,
                    decision,
                    transport_label=self.transport_label,
                    transport=self.transport,
                ),
            )
            if decision.allowed:
                allowed.append(plan)
                slots.append(plan)
            else:
                events.append(plan.event("blocked", rule_ids=decision.blocked_by))
                slots.append(
                    Outcome(
                        email=item.prospect.email,
                        status="blocked",
                        rule_ids=decision.blocked_by,
                        send_id=plan.send_id,
                        detail=policy.explain(decision),
                    )
                )
        await self.compose(allowed, campaign, options, now, events)
        # Durable before any transport is called: claims and every record of the chunk
        # (blocks, duplicates, `pending`, composition failures).
        await self.claim_and_record(allowed, campaign, options, events)
        # A plan still to deliver, or what became of it (duplicate, store failure...).
        return [
            slot if isinstance(slot, Outcome) or slot.final is None else slot.final
            for slot in slots
        ]

    async def compose(
        self,
        allowed: list[Plan],
        campaign: Campaign,
        options: Options,
        now: datetime,
        events: list[AuditEvent],
    ) -> None:
        """Build the message of every allowed send (claimed next, with its record).

        A send already ``pending`` or ``sent`` for this key is not composed unless forced: it
        is a duplicate (the claim confirms it). A message that cannot be built is recorded as
        ``failed`` and not claimed, so a later run retries it.
        """
        for p in allowed:
            if not options.force and p.item.claim_status in ("pending", "sent"):
                continue  # claim_and_record reports the duplicate
            args = (p.item.prospect, p.item.address, campaign, p.decision, p.send_id, now)
            message: EmailMessage | bytes
            try:
                if options.big:
                    # Seconds of email-package work for a big message: in a worker thread,
                    # straight to wire bytes, so the loop keeps serving other sessions.
                    message, message_id, token_id, template_hash = await asyncio.to_thread(
                        self.composer.compose_wire, *args, options.message
                    )
                else:
                    message, message_id, token_id, template_hash = self.composer.compose(
                        *args, options.message
                    )
            except (ConfigError, InvalidInputError, TemplateError, UnicodeError) as exc:
                detail = f"message could not be composed: {exc}"
                events.append(p.event("failed", extra={"error": detail}))
                p.final = failed_outcome(p, detail)
                continue
            p.message = message
            p.message_id = message_id
            p.extra = {"token_id": token_id, "footer_template_hash": template_hash}

    async def claim_and_record(
        self, allowed: list[Plan], campaign: Campaign, options: Options, events: list[AuditEvent]
    ) -> None:
        """Claim every composed send and append the chunk's records: one transaction on SQLite.

        A claim won gets its ``pending`` record, a claim held by another send a ``duplicate``
        record and outcome. If the store fails, nothing is sent (``failed`` outcomes).
        """
        plans = [p for p in allowed if p.final is None]
        requests = [
            ClaimRequest(
                campaign_id=campaign.id,
                step=campaign.step,
                recipient_hash=p.item.address.key_hash,
                advertiser_id=campaign.advertiser.id,
                send_id=p.send_id,
                message_key=options.message_key,
            )
            for p in plans
        ]
        if not requests and not events:
            return
        batch = ClaimBatch(requests, ChunkRecords.of(plans, events))
        try:
            if options.force:
                results, _ = await self.store.claim_and_record(requests, batch.record, force=True)
            else:
                results = await self._commits.claim(batch)
        except StoreError as exc:
            log.error("store unavailable, %d recipients not sent: %s", len(plans), exc)
            # Nothing was claimed on SQLite (one transaction); elsewhere the claims may have
            # been committed before the records failed: release them (a no-op otherwise).
            await self.release([p for p in plans if p.message is not None], campaign, options)
            for p in plans:
                p.final = failed_outcome(p, f"store failed, not sent: {exc}")
                p.message = None
            return
        raced: list[Plan] = []
        for p, claim in zip(plans, results, strict=True):
            if claim.claimed and p.message is None:
                # Read as pending/sent, so not composed, but retryable by the time it was
                # claimed (another run's send failed meanwhile): give it back, retry later.
                raced.append(p)
                p.final = Outcome(
                    email=p.item.prospect.email,
                    status="deferred",
                    send_id=p.send_id,
                    detail="its earlier send failed while this one was being prepared; "
                    "run again to retry it",
                )
                continue
            if claim.claimed:
                p.base = p.base | {"message_id": p.message_id}
                continue
            p.message = None
            p.final = Outcome(
                email=p.item.prospect.email,
                status="duplicate",
                send_id=claim.existing_send_id,
                message_id=claim.existing_message_id,
                detail=f"already {claim.existing_status} for campaign {campaign.id} "
                f"step {campaign.step}; not sent again",
            )
        if raced:
            await self.release(raced, campaign, options)
            try:
                await self.store.audit.append([p.event("deferred") for p in raced])
            except StoreError as exc:
                log.error("%d deferred records lost: %s", len(raced), exc)

    async def _commit_sends(
        self,
        batches: list[ClaimBatch],
        finished: list[tuple[FinishRequest, AuditEvent | PlannedEvent]],
    ) -> tuple[list[list[ClaimResult]] | Exception, Exception | None]:
        """The group commit of :meth:`claim_and_record` and of the sends' results: many
        chunks' claims and many results, one transaction on SQLite."""
        requests = [r for b in batches for r in b.requests]
        record = BatchRecords([(len(b.requests), b.record) for b in batches])
        claimed, failed = await self.store.commit_sends(
            requests, record, [r for r, _ in finished], [e for _, e in finished]
        )
        if isinstance(claimed, Exception):
            return claimed, failed
        split: list[list[ClaimResult]] = []
        at = 0
        for b in batches:
            split.append(claimed[at : at + len(b.requests)])
            at += len(b.requests)
        return split, failed

    async def release(self, plans: Sequence[Plan], campaign: Campaign, options: Options) -> None:
        """Mark claims ``failed`` (retryable); a store failure here is only logged."""
        if not plans:
            return
        try:
            await self.store.claims.finish_many(
                [p.finish_request(campaign, options, "failed") for p in plans]
            )
        except StoreError as exc:
            log.error("%d claims could not be released: %s", len(plans), exc)

    async def deliver(
        self,
        p: Plan,
        campaign: Campaign,
        options: Options,
        limit: asyncio.Semaphore | None,
    ) -> Outcome:
        assert p.message is not None
        email_addr = p.item.prospect.email
        async with limit or contextlib.nullcontext():  # a single send: nothing to bound
            try:
                delivery = await self.transport.send(
                    p.message,
                    sender=self.composer.envelope_sender(campaign, p.send_id),
                    recipients=[email_addr],
                )
            except TransportError as exc:
                status: Literal["failed", "deferred"] = (
                    "failed" if isinstance(exc, TransportPermanentError) else "deferred"
                )
                try:
                    await self._commits.submit(
                        p.finish_request(campaign, options, status),
                        p.planned(status, extra={"smtp_code": exc.code, "smtp_reply": exc.reply}),
                    )
                except StoreError as store_exc:
                    log.error("%s: could not record %s: %s", p.send_id, status, store_exc)
                return Outcome(
                    email=email_addr,
                    status=status,
                    send_id=p.send_id,
                    message_id=p.message_id,
                    smtp_code=exc.code,
                    smtp_reply=exc.reply,
                    detail=str(exc),
                )
        detail = ""
        try:
            await self._commits.submit(
                p.finish_request(campaign, options, "sent"),
                p.planned("sent", extra={"smtp_code": delivery.code, "smtp_reply": delivery.reply}),
            )
        except StoreError as exc:
            # The server accepted the mail: it *was* sent. Say so, and that the record lags.
            detail = f"sent, but recording it failed (claim stays pending): {exc}"
            log.error("%s: %s", p.send_id, detail)
        return Outcome(
            email=email_addr,
            status="sent",
            send_id=p.send_id,
            message_id=p.message_id,
            smtp_code=delivery.code,
            smtp_reply=delivery.reply,
            detail=detail,
        )

    async def try_audit_store_failure(
        self, chunk: Sequence[Prospect], campaign: Campaign, exc: StoreError
    ) -> None:
        events = [
            AuditEvent(
                kind="send",
                status="failed",
                send_id=new_id(),
                campaign_id=campaign.id,
                step=campaign.step,
                advertiser_id=campaign.advertiser.id,
                purpose=campaign.purpose,
                recipient_hash=p.address.key_hash,
                recipient_masked=p.address.masked,
                transport=self.transport_label,
                rule_ids=("SUPP_CHECK_AT_SEND",),
                details={"error": f"store unavailable: {exc}"},
            )
            for p in chunk
        ]
        try:
            await self.store.audit.append(events)
        except StoreError:
            return  # the store is down: the log line is all that can be written


#: Decisions :meth:`Pipeline.decide` keeps at most: more than the recipients of a relay's
#: messages between their RCPT and their DATA (each is taken at DATA); about 5 KB each.
_DECISIONS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class _Decided:
    prospect: Prospect
    campaign: Campaign
    facts: policy.Facts
    at: datetime
    until: datetime | None
    decision: Decision


async def _cancel_pending(slots: Sequence[Outcome | asyncio.Future[Outcome]]) -> None:
    """Stopped early (Ctrl-C, a consumer's break): let no send run on unobserved."""
    pending = [s for s in slots if isinstance(s, asyncio.Future) and not s.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class ClaimBatch:
    """One chunk's claims and the records that follow from their results."""

    requests: list[ClaimRequest]
    record: ChunkRecords


@plain_pickle
@dataclass(frozen=True, slots=True)
class ChunkRecords:
    """The records of a chunk given its claim results: ``events`` (known before claiming),
    then per claim a ``pending`` record if won, else a ``duplicate`` one.

    Plain data and a pure call, so that the writer may build the records in its own thread
    or process (the records are pickled there with the claims): each send is given by its
    audit base, send id, extra facts and Message-ID.
    """

    events: list[AuditEvent]
    sends: list[tuple[dict[str, Any], str, dict[str, Any], str | None]]

    @classmethod
    def of(cls, plans: list[Plan], events: list[AuditEvent]) -> ChunkRecords:
        return cls(events, [(p.base, p.send_id, p.extra, p.message_id) for p in plans])

    def __call__(self, results: list[ClaimResult]) -> list[AuditEvent]:
        out = list(self.events)
        for (base, send_id, extra, message_id), claim in zip(self.sends, results, strict=True):
            if claim.claimed:
                pending = plan_event(base, send_id, "pending", extra=extra)
                out.append(dataclasses.replace(pending, message_id=message_id))
            else:
                existing = {"existing_send_id": claim.existing_send_id}
                out.append(plan_event(base, send_id, "duplicate", extra=existing))
        return out


@plain_pickle
@dataclass(frozen=True, slots=True)
class BatchRecords:
    """The records of several chunks claimed in one transaction, given all their claim
    results in order (plain data: see :class:`ChunkRecords`)."""

    parts: list[tuple[int, ChunkRecords]]  # (how many claims, their records)

    def __call__(self, results: list[ClaimResult]) -> list[AuditEvent]:
        out: list[AuditEvent] = []
        at = 0
        for count, record in self.parts:
            out += record(results[at : at + count])
            at += count
        return out
