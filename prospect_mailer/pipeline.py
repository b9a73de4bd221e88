"""The send pipeline (DESIGN.md "The pipeline"), chunk by chunk.

For each chunk of recipients: one suppression query and one prior-contact query, the pure
policy for each, one transaction claiming every allowed send and one appending every decision
(blocks, duplicates, ``pending``) to the audit log; then the sends, with bounded concurrency,
whose results are group-committed (claim and audit) before each outcome is reported.

Fail closed: if the store cannot be read, nothing is sent (``failed``); if the transport fails,
the outcome is ``deferred`` (temporary) or ``failed`` (permanent), never ``sent``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from email.message import EmailMessage
from typing import Literal

from jinja2 import TemplateError

from . import policy
from .addresses import RoleClassifier, domain_keys_for
from .compose import Composer
from .errors import (
    ConfigError,
    InvalidInputError,
    StoreError,
    TransportError,
    TransportPermanentError,
)
from .models import Campaign, Outcome, Prospect
from .sendplan import (
    Finisher,
    GroupCommit,
    Item,
    Options,
    Plan,
    audit_base,
    chunks,
    failed_outcome,
    suppression_match,
)
from .store import (
    AuditEvent,
    AuditRecord,
    ClaimRequest,
    ClaimResult,
    Store,
)
from .transport import Transport

__all__ = ["Options", "Pipeline"]

log = logging.getLogger("prospect_mailer")


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
        self._claims: GroupCommit[ClaimRequest, ClaimResult] = GroupCommit(store.claims.claim_many)
        self._events: GroupCommit[AuditEvent, AuditRecord] = GroupCommit(store.audit.append)
        self._finisher = Finisher(store)

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
        finisher = self._finisher
        async for chunk in chunks(prospects, chunk_size):
            async for outcome in self.chunk(chunk, campaign, options, limit, finisher):
                yield outcome

    async def gather_facts(
        self, chunk: Sequence[Prospect], campaign: Campaign, options: Options
    ) -> list[Item | Outcome]:
        """One suppression query and one prior-contact query for the whole chunk."""
        addresses = [p.address for p in chunk]
        domain_keys = {a.domain: domain_keys_for(a.domain) for a in addresses}
        keys = {a.key_hash for a in addresses}
        for dk in domain_keys.values():
            keys.update(dk)
        try:
            hits = await self.store.suppression.lookup(sorted(keys))
            hashes = sorted({a.key_hash for a in addresses})
            prior = await self.store.claims.prior_contacts(campaign.advertiser.id, hashes)
            claimed: dict[str, str] = {}
            if options.dry_run:
                claimed = dict(
                    await self.store.claims.statuses(
                        campaign.id, campaign.step, hashes, message_key=options.message_key
                    )
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

    def dry_run(self, item: Item, campaign: Campaign, options: Options) -> Outcome:
        p = item.prospect
        decision = policy.decide(p, campaign, item.facts, self.clock())
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
        return Outcome(email=p.email, status="allowed", detail=warnings)

    async def chunk(
        self,
        chunk: Sequence[Prospect],
        campaign: Campaign,
        options: Options,
        limit: asyncio.Semaphore,
        finisher: Finisher,
    ) -> AsyncIterator[Outcome]:
        """One chunk: facts, decisions, claims and audit in a few transactions, then sends.

        Database work is batched per chunk (two reads, one claim transaction, one audit
        transaction); only the sends run one by one, with bounded concurrency, and their
        results are group-committed by the finisher.
        """
        items = await self.gather_facts(chunk, campaign, options)
        if options.dry_run:
            for item in items:
                yield item if isinstance(item, Outcome) else self.dry_run(item, campaign, options)
            return
        now = self.clock()
        slots: list[Outcome | Plan] = []
        events: list[AuditEvent] = []
        allowed: list[Plan] = []
        for item in items:
            if isinstance(item, Outcome):
                slots.append(item)
                continue
            decision = policy.decide(item.prospect, campaign, item.facts, now)
            plan = Plan(
                item,
                decision,
                uuid.uuid4().hex,
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
        await self.claim_and_compose(allowed, campaign, options, now, events)
        try:
            # Durable before any transport is called: blocks, duplicates and `pending`.
            if events:
                await self._events.submit(events)
        except StoreError as exc:
            log.error("audit unavailable, %d recipients not sent: %s", len(allowed), exc)
            failed = [p for p in allowed if p.message is not None]
            await self.release(failed, campaign, options)
            for p in failed:
                p.final = failed_outcome(p, f"store failed, not sent: {exc}")
            for p in allowed:
                p.message = None
        tasks: list[asyncio.Future[Outcome] | None] = []
        for slot in slots:
            if isinstance(slot, Plan) and slot.final is None and slot.message is not None:
                tasks.append(
                    asyncio.ensure_future(self.deliver(slot, campaign, options, limit, finisher))
                )
            else:
                tasks.append(None)
        try:
            for slot, task in zip(slots, tasks, strict=True):
                if task is not None:
                    yield await task
                elif isinstance(slot, Outcome):
                    yield slot
                else:
                    assert slot.final is not None
                    yield slot.final
        finally:
            # Stopped early (Ctrl-C, consumer break): let no send run on unobserved.
            pending = [t for t in tasks if t is not None and not t.done()]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def claim_and_compose(
        self,
        allowed: list[Plan],
        campaign: Campaign,
        options: Options,
        now: datetime,
        events: list[AuditEvent],
    ) -> None:
        """Claim every allowed send in one transaction, then compose the claimed ones."""
        if not allowed:
            return
        requests = [
            ClaimRequest(
                campaign_id=campaign.id,
                step=campaign.step,
                recipient_hash=p.item.address.key_hash,
                advertiser_id=campaign.advertiser.id,
                send_id=p.send_id,
                message_key=options.message_key,
            )
            for p in allowed
        ]
        try:
            claims = (
                await self.store.claims.claim_many(requests, force=True)
                if options.force
                else await self._claims.submit(requests)
            )
        except StoreError as exc:
            log.error("claims unavailable, %d recipients not sent: %s", len(allowed), exc)
            for p in allowed:
                p.final = failed_outcome(p, f"store failed, not sent: {exc}")
                events.append(p.event("failed", extra={"error": str(exc)}))
            return
        compose_failed: list[Plan] = []
        for p, claim in zip(allowed, claims, strict=True):
            if not claim.claimed:
                events.append(
                    p.event("duplicate", extra={"existing_send_id": claim.existing_send_id})
                )
                p.final = Outcome(
                    email=p.item.prospect.email,
                    status="duplicate",
                    send_id=claim.existing_send_id,
                    message_id=claim.existing_message_id,
                    detail=f"already {claim.existing_status} for campaign {campaign.id} "
                    f"step {campaign.step}; not sent again",
                )
                continue
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
                compose_failed.append(p)
                continue
            p.message = message
            p.message_id = message_id
            p.base = p.base | {"message_id": p.message_id}
            p.extra = {"token_id": token_id, "footer_template_hash": template_hash}
            events.append(p.event("pending", extra=p.extra))
        # A claim whose message could not be built is released for a later retry.
        await self.release(compose_failed, campaign, options)

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
        limit: asyncio.Semaphore,
        finisher: Finisher,
    ) -> Outcome:
        assert p.message is not None
        email_addr = p.item.prospect.email
        async with limit:
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
                    await finisher.submit(
                        p.finish_request(campaign, options, status),
                        p.event(status, extra={"smtp_code": exc.code, "smtp_reply": exc.reply}),
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
            await finisher.submit(
                p.finish_request(campaign, options, "sent"),
                p.event("sent", extra={"smtp_code": delivery.code, "smtp_reply": delivery.reply}),
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
                send_id=uuid.uuid4().hex,
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
