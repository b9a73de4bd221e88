"""The pipeline and :class:`ProspectMailer`, the library's entry point.

For each recipient (DESIGN.md "The pipeline"): normalise the address, gather the facts from the
store (one suppression query and one prior-contact query per chunk of recipients), decide with
the pure policy, then either record the block, or compose, apply the compliance step (which the
caller cannot skip), claim the send durably, hand it to the transport and record the result.

Fail closed: if the store cannot be read, nothing is sent (``failed``); if the transport fails,
the outcome is ``deferred`` (temporary) or ``failed`` (permanent), never ``sent``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from typing import Any, Literal, Self

from jinja2 import TemplateError

from . import policy
from .addresses import NormalisedAddress, RoleClassifier, domain_keys_for, normalise
from .compliance import FooterContext, FooterRenderer, apply_compliance
from .config import PLACEHOLDER_BASE_URL, Settings, load_settings
from .errors import (
    ConfigError,
    InvalidInputError,
    StoreError,
    TransportError,
    TransportPermanentError,
)
from .fastmime import compose_bytes
from .mime import parse_message
from .models import Campaign, Decision, Outcome, Prospect
from .store import (
    AuditEvent,
    ClaimRequest,
    ClaimStatus,
    FinishRequest,
    Store,
    SuppressionHit,
)
from .tokens import TokenSigner, UnsubscribeToken
from .transport import OutboxTransport, SMTPTransport, Transport

__all__ = ["ProgressCallback", "ProspectMailer", "SendSummary"]

log = logging.getLogger("prospect_mailer")

#: Called after each recipient with its outcome and the running totals.
ProgressCallback = Callable[[Outcome, "SendSummary"], None]


@dataclass
class SendSummary:
    """Running totals of a :meth:`ProspectMailer.send_many` call.

    Attributes:
        counts: outcomes by status (``sent``, ``blocked``, ``failed``, ``deferred``,
            ``duplicate``).
        blocked_by_rule: how many recipients each rule id blocked (a recipient blocked by two
            rules counts for both).
    """

    counts: Counter[str] = field(default_factory=Counter)
    blocked_by_rule: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Recipients processed so far."""
        return sum(self.counts.values())

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        self.counts[outcome.status] += 1
        if outcome.status == "blocked":
            self.blocked_by_rule.update(outcome.rule_ids)


@dataclass(frozen=True, slots=True)
class _Options:
    force: bool = False
    dry_run: bool = False
    message: EmailMessage | None = None  # the caller's message (relay) instead of templates
    message_key: str = ""


@dataclass(frozen=True, slots=True)
class _Item:
    prospect: Prospect
    address: NormalisedAddress
    facts: policy.Facts
    claim_status: str | None = None  # only looked up for dry runs


class ProspectMailer:
    """Sends prospecting mail with the rules enforced at send time.

    Build it with :meth:`from_settings` (opens the store and the transport from settings) or
    directly with a store and transport you own. Use it as an async context manager, or call
    :meth:`close`.

    Args:
        store: the opened store (suppression list, audit log, send claims).
        transport: where accepted mail goes (SMTP, outbox, memory).
        signer: unsubscribe-token signer.
        base_url: public HTTPS base of the unsubscribe handler.
        mailto_domain: domain of the ``unsubscribe+TOKEN@`` address, or ``None`` for none.
        bounce_domain: domain of the VERP envelope sender ``bounce+TOKEN@`` (``None``: the
            campaign's From address is the envelope sender).
        renderer: footer renderer (default templates unless given).
        classifier: role-address classifier.
        concurrency: messages in flight at once in :meth:`send_many`.
        clock: returns the current UTC time (a parameter so tests can fix it).
        transport_label: recorded in the audit log (``library``, ``relay``...).
    """

    def __init__(
        self,
        *,
        store: Store,
        transport: Transport,
        signer: TokenSigner,
        base_url: str,
        mailto_domain: str | None = None,
        bounce_domain: str | None = None,
        renderer: FooterRenderer | None = None,
        classifier: RoleClassifier | None = None,
        concurrency: int = 10,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        transport_label: str = "library",
        owns_resources: bool = False,
    ) -> None:
        if not base_url.startswith("https://"):
            raise ConfigError("base_url must be an https:// URL")
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        self.store = store
        self.transport = transport
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self.mailto_domain = mailto_domain
        self.bounce_domain = bounce_domain
        self.renderer = renderer or FooterRenderer()
        self.classifier = classifier or RoleClassifier()
        self.concurrency = concurrency
        self.clock = clock
        self.transport_label = transport_label
        self._owns = owns_resources

    @classmethod
    async def from_settings(cls, settings: Settings | None = None) -> ProspectMailer:
        """Open the store and transport described by ``settings`` (default: environment).

        Raises:
            ConfigError: invalid settings, or SMTP sending with the placeholder base URL
                (links would not work: FR_OPTOUT_EVERY_MESSAGE).
            StoreError: the database cannot be opened.
        """
        s = settings or load_settings()
        smtp_url = s.smtp_url.get_secret_value() if s.smtp_url else None
        if smtp_url and s.base_url == PLACEHOLDER_BASE_URL:
            raise ConfigError(
                "PROSPECT_MAILER_BASE_URL is not set: real mail needs a working unsubscribe "
                "link (FR_OPTOUT_EVERY_MESSAGE); set it to your unsubscribe handler's https URL"
            )
        signer = TokenSigner(s.signing_keys())
        transport: Transport = (
            SMTPTransport.from_url(smtp_url, timeout=s.smtp_timeout)
            if smtp_url
            else OutboxTransport(s.outbox_dir)
        )
        store = await Store.open(s.database_url)
        return cls(
            store=store,
            transport=transport,
            signer=signer,
            base_url=s.base_url,
            mailto_domain=s.unsubscribe_mailto_domain,
            bounce_domain=s.bounce_domain,
            renderer=FooterRenderer(s.template_dirs),
            classifier=RoleClassifier(extra_names=frozenset(s.role_names)),
            concurrency=s.concurrency,
            owns_resources=True,
        )

    async def close(self) -> None:
        """Flush the audit log; close the transport and the store if this mailer opened them."""
        if self._owns:
            try:
                await self.transport.close()
            finally:
                await self.store.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API -----------------------------------------------------------------------------

    async def send(
        self,
        prospect: Prospect,
        campaign: Campaign,
        *,
        force: bool = False,
        dry_run: bool = False,
        message: EmailMessage | bytes | None = None,
        message_key: str = "",
    ) -> Outcome:
        """Decide and, if allowed, send one message.

        A blocked recipient is an :class:`Outcome` with ``status="blocked"``, not an exception.

        Args:
            prospect: the recipient.
            campaign: the campaign (step) to send.
            force: send again even if this campaign step was already sent to this recipient.
            dry_run: decide exactly as a real send would (suppression, rules, retention,
                idempotency) but send and record nothing; an allowed recipient comes back
                with ``status="allowed"``.
            message: send this message (e.g. one an SMTP client handed to the relay) instead
                of rendering the campaign's templates. The compliance step still applies.
            message_key: part of the idempotency key; the relay passes the Message-ID so that
                a client's retry of one message is a duplicate, not a new campaign step.

        Raises:
            InvalidMessageError: ``message`` cannot be processed safely.
        """
        # Parsed (and its headers checked for CVE-2024-6923 style CR/LF) before any decision.
        parsed = parse_message(message) if message is not None else None
        options = _Options(force=force, dry_run=dry_run, message=parsed, message_key=message_key)
        async for outcome in self._iter([prospect], campaign, options, None, 1):
            return outcome
        raise AssertionError("unreachable: one prospect gives one outcome")  # pragma: no cover

    async def send_many(
        self,
        prospects: Iterable[Prospect] | AsyncIterable[Prospect],
        campaign: Campaign,
        *,
        concurrency: int | None = None,
        progress: ProgressCallback | None = None,
        force: bool = False,
        dry_run: bool = False,
        chunk_size: int = 200,
    ) -> SendSummary:
        """Send ``campaign`` to a stream of prospects of any length, in constant memory.

        Outcomes are not kept (a million would not fit the promise of constant memory): use
        ``progress`` to see each one, or :meth:`iter_send` to iterate over them.

        Returns:
            The totals by status and the blocks by rule id.
        """
        summary = SendSummary()
        async for outcome in self.iter_send(
            prospects,
            campaign,
            concurrency=concurrency,
            force=force,
            dry_run=dry_run,
            chunk_size=chunk_size,
        ):
            summary.add(outcome)
            if progress is not None:
                progress(outcome, summary)
        return summary

    async def iter_send(
        self,
        prospects: Iterable[Prospect] | AsyncIterable[Prospect],
        campaign: Campaign,
        *,
        concurrency: int | None = None,
        force: bool = False,
        dry_run: bool = False,
        chunk_size: int = 200,
    ) -> AsyncIterator[Outcome]:
        """Like :meth:`send_many`, yielding each :class:`Outcome` (chunk by chunk, in order)."""
        options = _Options(force=force, dry_run=dry_run)
        async for outcome in self._iter(prospects, campaign, options, concurrency, chunk_size):
            yield outcome

    async def _iter(
        self,
        prospects: Iterable[Prospect] | AsyncIterable[Prospect],
        campaign: Campaign,
        options: _Options,
        concurrency: int | None,
        chunk_size: int,
    ) -> AsyncIterator[Outcome]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        limit = asyncio.Semaphore(concurrency or self.concurrency)
        finisher = _Finisher(self.store)
        async for chunk in _chunks(prospects, chunk_size):
            async for outcome in self._chunk(chunk, campaign, options, limit, finisher):
                yield outcome

    async def _gather_facts(
        self, chunk: Sequence[Prospect], campaign: Campaign, options: _Options
    ) -> list[_Item | Outcome]:
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
            await self._try_audit_store_failure(chunk, campaign, exc)
            return [
                Outcome(
                    email=p.email,
                    status="failed",
                    rule_ids=("SUPP_CHECK_AT_SEND",),
                    detail=f"store unavailable, not sent: {exc}",
                )
                for p in chunk
            ]
        items: list[_Item | Outcome] = []
        for p, a in zip(chunk, addresses, strict=True):
            matches = [
                _match(h) for k in (a.key_hash, *domain_keys[a.domain]) for h in hits.get(k, ())
            ]
            facts = policy.Facts(
                suppression=tuple(matches),
                prior_contact=a.key_hash in prior,
                role_address=self.classifier.is_role(a),
                classifier_version=self.classifier.version,
            )
            items.append(
                _Item(prospect=p, address=a, facts=facts, claim_status=claimed.get(a.key_hash))
            )
        return items

    def _dry_run(self, item: _Item, campaign: Campaign, options: _Options) -> Outcome:
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

    async def _chunk(
        self,
        chunk: Sequence[Prospect],
        campaign: Campaign,
        options: _Options,
        limit: asyncio.Semaphore,
        finisher: _Finisher,
    ) -> AsyncIterator[Outcome]:
        """One chunk: facts, decisions, claims and audit in a few transactions, then sends.

        Database work is batched per chunk (two reads, one claim transaction, one audit
        transaction); only the sends run one by one, with bounded concurrency, and their
        results are group-committed by the finisher.
        """
        items = await self._gather_facts(chunk, campaign, options)
        if options.dry_run:
            for item in items:
                yield item if isinstance(item, Outcome) else self._dry_run(item, campaign, options)
            return
        now = self.clock()
        slots: list[Outcome | _Plan] = []
        events: list[AuditEvent] = []
        allowed: list[_Plan] = []
        for item in items:
            if isinstance(item, Outcome):
                slots.append(item)
                continue
            decision = policy.decide(item.prospect, campaign, item.facts, now)
            plan = _Plan(
                item, decision, uuid.uuid4().hex, _audit_base(self, item, campaign, decision)
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
        await self._claim_and_compose(allowed, campaign, options, now, events)
        try:
            # Durable before any transport is called: blocks, duplicates and `pending`.
            if events:
                await self.store.audit.append(events)
        except StoreError as exc:
            log.error("audit unavailable, %d recipients not sent: %s", len(allowed), exc)
            failed = [p for p in allowed if p.message is not None]
            await self._release(failed, campaign, options)
            for p in failed:
                p.final = _failed(p, f"store failed, not sent: {exc}")
            for p in allowed:
                p.message = None
        tasks: list[asyncio.Future[Outcome] | None] = []
        for slot in slots:
            if isinstance(slot, _Plan) and slot.final is None and slot.message is not None:
                tasks.append(
                    asyncio.ensure_future(self._deliver(slot, campaign, options, limit, finisher))
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

    async def _claim_and_compose(
        self,
        allowed: list[_Plan],
        campaign: Campaign,
        options: _Options,
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
            claims = await self.store.claims.claim_many(requests, force=options.force)
        except StoreError as exc:
            log.error("claims unavailable, %d recipients not sent: %s", len(allowed), exc)
            for p in allowed:
                p.final = _failed(p, f"store failed, not sent: {exc}")
                events.append(p.event("failed", extra={"error": str(exc)}))
            return
        compose_failed: list[_Plan] = []
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
            try:
                message, message_id, token_id, template_hash = self._compose(
                    p.item, campaign, p.decision, p.send_id, now, options.message
                )
            except (ConfigError, InvalidInputError, TemplateError, UnicodeError) as exc:
                detail = f"message could not be composed: {exc}"
                events.append(p.event("failed", extra={"error": detail}))
                p.final = _failed(p, detail)
                compose_failed.append(p)
                continue
            p.message = message
            p.message_id = message_id
            p.base = p.base | {"message_id": p.message_id}
            p.extra = {"token_id": token_id, "footer_template_hash": template_hash}
            events.append(p.event("pending", extra=p.extra))
        # A claim whose message could not be built is released for a later retry.
        await self._release(compose_failed, campaign, options)

    async def _release(self, plans: Sequence[_Plan], campaign: Campaign, options: _Options) -> None:
        """Mark claims ``failed`` (retryable); a store failure here is only logged."""
        if not plans:
            return
        try:
            await self.store.claims.finish_many(
                [p.finish_request(campaign, options, "failed") for p in plans]
            )
        except StoreError as exc:
            log.error("%d claims could not be released: %s", len(plans), exc)

    async def _deliver(
        self,
        p: _Plan,
        campaign: Campaign,
        options: _Options,
        limit: asyncio.Semaphore,
        finisher: _Finisher,
    ) -> Outcome:
        assert p.message is not None
        email_addr = p.item.prospect.email
        async with limit:
            try:
                delivery = await self.transport.send(
                    p.message,
                    sender=self.envelope_sender(campaign, p.send_id),
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

    # -- composition ----------------------------------------------------------------------------

    def unsubscribe_url(self, token: str) -> str:
        """The HTTPS one-click URL for a token."""
        return f"{self.base_url}/unsubscribe/{token}"

    def _render_bodies(
        self, p: Prospect, campaign: Campaign, url: str, locale: str
    ) -> tuple[str | None, str | None]:
        """Render the campaign's text and HTML templates for one prospect."""
        context: dict[str, Any] = {
            "prospect": p,
            "campaign": campaign,
            "advertiser": campaign.advertiser,
            "unsubscribe_url": url,
            "locale": locale,
        }
        text = (
            self.renderer.render_string(campaign.text_template, context, html=False)
            if campaign.text_template
            else None
        )
        html = (
            self.renderer.render_string(campaign.html_template, context, html=True)
            if campaign.html_template
            else None
        )
        return text, html

    def envelope_sender(self, campaign: Campaign, send_id: str) -> str:
        """MAIL FROM for a send: a VERP ``bounce+TOKEN@`` address when a bounce domain is set.

        The token names the send, so a bounce or complaint received there resolves to the
        recipient without trusting anything in the bounce itself.
        """
        if self.bounce_domain:
            return f"bounce+{self.signer.make_short(send_id)}@{self.bounce_domain}"
        return campaign.from_address

    def _compose(
        self,
        item: _Item,
        campaign: Campaign,
        decision: Decision,
        send_id: str,
        now: datetime,
        given: EmailMessage | None,
    ) -> tuple[EmailMessage | bytes, str, str, str]:
        p = item.prospect
        locale = p.locale or campaign.locale
        token = self.signer.make(
            UnsubscribeToken(
                recipient_hash=item.address.key_hash,
                advertiser_id=campaign.advertiser.id,
                campaign_id=campaign.id,
                scope="advertiser",
                locale=locale,
            )
        )
        url = self.unsubscribe_url(token)
        mailto = (
            f"mailto:unsubscribe+{self.signer.make_short(send_id)}@{self.mailto_domain}"
            if self.mailto_domain
            else None
        )
        from_domain = normalise(campaign.from_address).domain
        collected: date | None = p.collected_at.date() if p.collected_at else None
        footers = self.renderer.render(
            FooterContext(
                locale=locale,
                advertiser_legal_name=campaign.advertiser.legal_name,
                advertiser_postal_address=campaign.advertiser.postal_address,
                advertiser_contact=campaign.advertiser.contact,
                unsubscribe_url=url,
                unsubscribe_mailto=mailto,
                source_name=p.source_name,
                source_type=p.source_type,
                collection_method=p.collection_method,
                collected_at=collected,
                first_contact=decision.first_contact,
                campaign_id=campaign.id,
                recipient_name=p.name,
            )
        )
        token_id = self.signer.token_id(token)
        if given is not None:
            # Someone else's MIME (the relay): inject into every text part of a copy.
            final = apply_compliance(
                given,
                footers,
                list_unsubscribe_url=url,
                list_unsubscribe_mailto=mailto,
                message_id_domain=from_domain,
                now=now,
            )
            return final, str(final["Message-ID"]), token_id, footers.template_hash
        # Our own message: footers joined to the rendered bodies, MIME written once.
        text, html = self._render_bodies(p, campaign, url, locale)
        # Short enough never to be folded, and it names the send: a bounce quoting it leads
        # straight to the audit record.
        message_id = f"<{send_id}@{from_domain}>"
        data = compose_bytes(
            from_name=campaign.from_name,
            from_address=campaign.from_address,
            to_name=p.name or "",
            to_address=p.email,
            subject=campaign.subject,
            reply_to=campaign.reply_to,
            message_id=message_id,
            now=now,
            text=text,
            html=html,
            footers=footers,
            list_unsubscribe_url=url,
            list_unsubscribe_mailto=mailto,
        )
        return data, message_id, token_id, footers.template_hash

    # -- records --------------------------------------------------------------------------------

    async def _try_audit_store_failure(
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


@dataclass(eq=False)
class _Plan:
    """One allowed or blocked recipient of a chunk, as it moves through the pipeline."""

    item: _Item
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
        details = dict(self.base["details"])
        if extra:
            details.update({k: v for k, v in extra.items() if v is not None})
        fields = {k: v for k, v in self.base.items() if k != "details"}
        return AuditEvent(
            **fields,
            send_id=self.send_id,
            status=status,
            rule_ids=tuple(rule_ids),
            details=details,
        )

    def finish_request(
        self, campaign: Campaign, options: _Options, status: ClaimStatus
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


def _failed(p: _Plan, detail: str) -> Outcome:
    return Outcome(email=p.item.prospect.email, status="failed", send_id=p.send_id, detail=detail)


class _Finisher:
    """Group commit of send results: claim updates and audit records of whatever finished
    while the previous batch was committing go in one pair of transactions. Each caller
    resumes only once its own records are durable."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[FinishRequest, AuditEvent, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, request: FinishRequest, event: AuditEvent) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((request, event, future))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self._store.claims.finish_many([r for r, _, _ in batch])
                await self._store.audit.append([e for _, e, _ in batch])
            except Exception as exc:
                for _, _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
            else:
                for _, _, f in batch:
                    if not f.done():
                        f.set_result(None)


def _match(hit: SuppressionHit) -> policy.SuppressionMatch:
    return policy.SuppressionMatch(
        kind=hit.kind, scope=hit.scope, scope_value=hit.scope_value, reason=hit.reason
    )


def _audit_base(
    mailer: ProspectMailer, item: _Item, campaign: Campaign, decision: Decision
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
        "transport": mailer.transport_label,
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
            "transport_kind": getattr(mailer.transport, "name", type(mailer.transport).__name__),
        },
    }


async def _chunks(
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
