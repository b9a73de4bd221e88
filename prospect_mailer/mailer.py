""":class:`ProspectMailer`, the library's entry point (the pipeline is in :mod:`.pipeline`).

Every send decides with the pure policy on facts from the store, applies the compliance step
(which the caller cannot skip), claims the send durably, hands it to the transport and records
the result. Fail closed: without the store nothing is sent; a transport failure is ``deferred``
or ``failed``, never ``sent``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Self

from .addresses import RoleClassifier
from .compliance import FooterRenderer
from .compose import Composer, RawMessage
from .config import PLACEHOLDER_BASE_URL, Settings, load_settings
from .errors import (
    ConfigError,
)
from .mime import check_headers_safe, parse_message
from .models import Campaign, Outcome, Prospect
from .pipeline import Options, Pipeline
from .store import (
    Store,
)
from .tokens import TokenSigner
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
        self._owns = owns_resources
        # One copy of each setting: the composer and the pipeline hold them, the properties
        # below read them there.
        self.composer = Composer(
            signer=signer,
            base_url=base_url,
            mailto_domain=mailto_domain,
            bounce_domain=bounce_domain,
            renderer=renderer or FooterRenderer(),
        )
        self.pipeline = Pipeline(
            store=store,
            transport=transport,
            composer=self.composer,
            classifier=classifier or RoleClassifier(),
            clock=clock,
            transport_label=transport_label,
            concurrency=concurrency,
        )

    @property
    def store(self) -> Store:
        """The store (suppression list, audit log, claims, registry)."""
        return self.pipeline.store

    @property
    def transport(self) -> Transport:
        """Where accepted mail goes."""
        return self.pipeline.transport

    @property
    def signer(self) -> TokenSigner:
        """The unsubscribe-token signer."""
        return self.composer.signer

    @property
    def base_url(self) -> str:
        """Public HTTPS base of the unsubscribe handler (no trailing slash)."""
        return self.composer.base_url

    @property
    def mailto_domain(self) -> str | None:
        """Domain of the ``unsubscribe+TOKEN@`` address."""
        return self.composer.mailto_domain

    @property
    def bounce_domain(self) -> str | None:
        """Domain of the VERP envelope sender, if any."""
        return self.composer.bounce_domain

    @property
    def renderer(self) -> FooterRenderer:
        """Footer and body template renderer."""
        return self.composer.renderer

    @property
    def classifier(self) -> RoleClassifier:
        """Role-address classifier."""
        return self.pipeline.classifier

    @property
    def concurrency(self) -> int:
        """Messages in flight at once in :meth:`send_many` by default."""
        return self.pipeline.concurrency

    @property
    def clock(self) -> Callable[[], datetime]:
        """Returns the current UTC time."""
        return self.pipeline.clock

    @property
    def transport_label(self) -> str:
        """Recorded in the audit log (``library``, ``relay``...)."""
        return self.pipeline.transport_label

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
        message: EmailMessage | bytes | RawMessage | None = None,
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
                A :class:`~prospect_mailer.compose.RawMessage` (wire bytes) is composed on the
                byte level when its shape allows, without the email package.
            message_key: part of the idempotency key; the relay passes the Message-ID so that
                a client's retry of one message is a duplicate, not a new campaign step.

        Raises:
            InvalidMessageError: ``message`` cannot be processed safely.
        """
        # Headers checked (CVE-2024-6923 style CR/LF) before any decision. A message object is
        # not copied here: the compliance step works on its own copy per recipient and never
        # changes the caller's object, so one copy per send is enough.
        parsed: EmailMessage | RawMessage | None
        if isinstance(message, RawMessage):
            # Checked header by header as it is composed (byte level or email package).
            parsed = message
        elif isinstance(message, bytes | bytearray):
            parsed = parse_message(bytes(message))
        elif message is not None:
            check_headers_safe(message)
            parsed = message
        else:
            parsed = None
        if isinstance(parsed, RawMessage):
            big = len(parsed.data) > BIG_MESSAGE
        else:
            big = parsed is not None and _approx_size(parsed) > BIG_MESSAGE
        options = Options(
            force=force, dry_run=dry_run, message=parsed, message_key=message_key, big=big
        )
        return await self.pipeline.one(prospect, campaign, options)

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
        options = Options(force=force, dry_run=dry_run)
        async for outcome in self.pipeline.run(
            prospects, campaign, options, concurrency, chunk_size
        ):
            yield outcome

    def unsubscribe_url(self, token: str) -> str:
        """The HTTPS one-click URL for a token."""
        return self.composer.unsubscribe_url(token)

    def envelope_sender(self, campaign: Campaign, send_id: str) -> str:
        """MAIL FROM for a send (a VERP ``bounce+TOKEN@`` address when configured)."""
        return self.composer.envelope_sender(campaign, send_id)


#: A caller's message larger than this is composed and serialised off the event loop.
BIG_MESSAGE = 256 * 1024


def _approx_size(message: EmailMessage) -> int:
    """Sum of the encoded payload lengths (cheap: no header is parsed)."""
    total = 0
    for part in message.walk():
        payload = part.get_payload()
        if isinstance(payload, str | bytes):
            total += len(payload)
    return total
