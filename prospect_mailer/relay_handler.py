"""The relay's SMTP hooks: a thin adapter from SMTP commands to the one pipeline.

No rule lives here. At ``RCPT TO`` the recipient is looked up in the prospect registry and
the pipeline is asked for a dry run (``mailer.send(..., dry_run=True)``); at ``DATA`` the
pipeline sends the client's message once per recipient (``message=``, keyed by Message-ID).
Replies come from :mod:`prospect_mailer.relay_replies`, the one place outcomes become codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Protocol

from aiosmtpd.smtp import Envelope

from .addresses import normalise
from .campaigns import parse_campaign_ref
from .compose import RawMessage, prepare_relay_message
from .errors import InvalidAddressError, InvalidInputError, InvalidMessageError, StoreError
from .mailer import ProspectMailer
from .mime import crlf_only, parse_message
from .models import Campaign, Prospect
from .optout import OptOutService
from .rawmime import RawHeaders, scan_headers
from .relay_auth import RelayAuth
from .relay_config import RelaySettings
from .relay_dsn import build_dsn
from .relay_replies import (
    REPLY_RELAY_DENIED,
    REPLY_TEMPORARY,
    RecipientResult,
    inbound_result,
    message_reply,
    recipient_result,
    reply_line,
)
from .sendplan import Options
from .store import AuditEvent
from .transport import Transport

if TYPE_CHECKING:
    from .relay import RelaySession

__all__ = [
    "InboundHandler",
    "InboundReply",
    "RelayEnvelope",
    "RelayHandler",
    "aiosmtpd_names",
    "bare_line_break",
]

log = logging.getLogger("prospect_mailer.relay")

#: Messages larger than this are parsed and composed off the event loop (bytes).
BIG_MESSAGE = 256 * 1024

# A CR or LF that is not part of a CRLF pair. Servers disagree on what such a byte means, and
# that disagreement is SMTP smuggling (a second message hidden in the first); Postfix's
# smtpd_forbid_bare_newline=reject refuses it outright, and so do we.
_BARE_LINE_BREAK = re.compile(rb"(?<!\r)\n|\r(?!\n)")


#: The RCPT-time check: a dry run without the duplicate lookup (a duplicate is accepted like an
#: allowed recipient, DATA reports it), whose decision the send at DATA takes if the facts it
#: reads again are the same.
_RCPT_CHECK = Options(dry_run=True, duplicates=False, keep_decision=True)


def bare_line_break(data: bytes) -> int | None:
    """Offset of the first CR or LF not part of a CRLF pair in ``data``, else ``None``.

    Counted first (``bytes.count`` runs at memchr speed): only a message that has a bare
    one pays for the regex that finds it, which over 20 MB would hold the GIL for half a
    second.
    """
    if crlf_only(data):
        return None
    match = _BARE_LINE_BREAK.search(data)
    return None if match is None else match.start()


#: What aiosmtpd looks up by introspection (``dir`` and ``inspect.getmembers``) on the session
#: and on the handler, for every new connection: its command, AUTH and hook methods.
_AIOSMTPD_PREFIXES = ("smtp_", "auth_", "handle_")


_NAMES: dict[type, list[str]] = {}


def aiosmtpd_names(cls: type) -> list[str]:
    """The names of ``cls``'s command, AUTH and hook methods, sorted as ``dir`` sorts them.

    The relay's session and handler answer ``dir()`` with these only: aiosmtpd builds its
    tables from ``dir`` and ``inspect.getmembers`` on every new connection, and listing (and
    ``getattr``-ing) all of their 190 names cost about 140 µs a connection. The tables come out
    the same (tested).
    """
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = sorted(n for n in dir(cls) if n.startswith(_AIOSMTPD_PREFIXES))
    return list(names)


class InboundReply(Protocol):
    """What the inbound (opt-out by mail, bounce) handler answers."""

    @property
    def accepted(self) -> bool:
        """The message was processed (suppression written)."""

    @property
    def reply(self) -> str:
        """The SMTP reply line, e.g. ``"250 2.0.0 unsubscribed"``."""


#: ``handle_inbound(optout, rcpt, data)`` from :mod:`prospect_mailer.inbound`.
InboundHandler = Callable[[OptOutService, str, bytes], Awaitable[InboundReply]]


@dataclass(frozen=True, slots=True)
class _Rcpt:
    address: str
    prospect: Prospect | None  # None: an inbound (opt-out or bounce) address


def _recipient_key(rcpt: _Rcpt) -> str:
    """The claim's recipient key of a prospect's recipient."""
    assert rcpt.prospect is not None
    return rcpt.prospect.address.key_hash


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus what the relay learnt during the transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.campaign: Campaign | None = None
        self.bound_by = ""  # "auth user" or "sender", for the reply texts
        self.recipients: list[_Rcpt] = []


class RelayHandler(RelayAuth):
    """aiosmtpd handler hooks of the relay (one object shared by every connection).

    Args:
        mailer: the pipeline (its store, signer, domains and transport label ``relay``).
        settings: the relay settings.
        inbound: the opt-out/bounce handler, or ``None`` when not installed.
        dsn_transport: where DSNs go (the upstream, never DKIM-signed as a prospecting mail).
    """

    def __init__(
        self,
        *,
        mailer: ProspectMailer,
        settings: RelaySettings,
        inbound: InboundHandler | None,
        dsn_transport: Transport,
    ) -> None:
        self.mailer = mailer
        self.settings = settings
        self.inbound = inbound
        self.optout = OptOutService(mailer.store, mailer.signer, clock=mailer.clock)
        self.dsn_transport = dsn_transport
        # The claims (campaign, step, recipient key, message key) being delivered now.
        self._delivering: set[tuple[str, int, str, str]] = set()
        routes = [("unsubscribe", mailer.mailto_domain), ("bounce", mailer.bounce_domain)]
        self._inbound_routes = [
            re.compile(rf"{local}\+[^@\s]+@{re.escape(domain)}", re.IGNORECASE)
            for local, domain in routes
            if domain
        ]

    def __dir__(self) -> list[str]:
        """Only the hook and AUTH methods (see :func:`aiosmtpd_names`)."""
        return aiosmtpd_names(type(self))

    # -- helpers --------------------------------------------------------------------------------

    def is_inbound(self, address: str) -> bool:
        """``unsubscribe+TOKEN@<mailto domain>`` or ``bounce+TOKEN@<bounce domain>``."""
        return any(route.fullmatch(address) for route in self._inbound_routes)

    async def _campaign(self, ref: str) -> Campaign | None:
        try:
            cid, step = parse_campaign_ref(ref)
        except ValueError:
            return None
        return await self.mailer.store.campaigns.get(cid, step)

    async def _audit(self, event: AuditEvent) -> None:
        try:
            await self.mailer.store.audit.append([event])
        except (StoreError, InvalidInputError) as exc:
            log.error("relay audit record %s lost: %s", event.status, exc)

    async def _audit_refusal(
        self, address: str, campaign: Campaign | None, rule_ids: tuple[str, ...], why: str
    ) -> None:
        a = normalise(address)
        await self._audit(
            AuditEvent(
                kind="send",
                status="blocked",
                campaign_id=campaign.id if campaign else None,
                step=campaign.step if campaign else None,
                advertiser_id=campaign.advertiser.id if campaign else None,
                purpose=campaign.purpose if campaign else None,
                recipient_hash=a.key_hash,
                recipient_masked=a.masked,
                transport="relay",
                rule_ids=rule_ids,
                details={"stage": "rcpt", "reason": why},
            )
        )

    # -- hooks ----------------------------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        """A bug must not become a 5xx that makes the client drop the message: 451."""
        log.error("relay: unexpected error", exc_info=error)
        return reply_line(REPLY_TEMPORARY, "internal error, try again later")

    async def handle_MAIL(
        self,
        server: RelaySession,
        session: Any,
        envelope: RelayEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Bind the campaign from the AUTH user or the sender address, when mapped."""
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        if not server.permitted:
            return "250 2.1.0 OK"  # only opt-out/bounce addresses will be accepted at RCPT
        user = self.settings.user(server.authenticated_user) if server.authenticated_user else None
        if user is not None and user.campaign:
            ref, envelope.bound_by = user.campaign, "auth user"
        else:
            ref = self.settings.sender_campaigns.get(address.strip().lower(), "")
            envelope.bound_by = "sender" if ref else ""
        if ref:
            try:
                envelope.campaign = await self._campaign(ref)
            except StoreError as exc:
                envelope.mail_from = None
                return reply_line(REPLY_TEMPORARY, f"store unavailable: {exc}")
            if envelope.campaign is None:
                envelope.mail_from = None
                return reply_line(
                    REPLY_TEMPORARY,
                    f"campaign {ref!r} mapped to this {envelope.bound_by} is not registered "
                    "(prospect-mailer campaigns add FILE)",
                )
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: RelaySession,
        session: Any,
        envelope: RelayEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Refuse at once every recipient the facts known now already block."""
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients for one message"
        if self.is_inbound(address):
            # Objections must get through from anywhere, unauthenticated (OPTOUT_MAILTO_INBOUND).
            if self.inbound is None:
                return reply_line(REPLY_TEMPORARY, "opt-out by mail is not enabled here yet")
            return self._accept(envelope, _Rcpt(address, None))
        if not server.permitted:
            return reply_line(
                REPLY_RELAY_DENIED,
                f"<{address}>: relay access denied (authenticate over TLS or connect "
                "from an allowed network)",
            )
        try:
            prospect = await self.mailer.store.prospects.get(address)
        except InvalidAddressError as exc:
            return reply_line("553 5.1.3", str(exc))
        except StoreError as exc:
            return reply_line(REPLY_TEMPORARY, f"store unavailable: {exc}")
        if prospect is None:
            why = "not in the prospect registry: the origin of the data is unknown"
            await self._audit_refusal(address, envelope.campaign, ("RELAY_UNKNOWN_RECIPIENT",), why)
            return reply_line("550 5.7.1", f"RELAY_UNKNOWN_RECIPIENT: <{address}> is {why}")
        if envelope.campaign is not None:
            # The rules and the suppression list on the facts known now; a duplicate is
            # accepted like an allowed recipient (DATA reports it), so it is not looked up.
            outcome = await self.mailer.pipeline.one(prospect, envelope.campaign, _RCPT_CHECK)
            result = recipient_result(address, outcome)
            if not result.ok:
                if result.kind == "blocked":
                    await self._audit_refusal(
                        address, envelope.campaign, result.rule_ids, outcome.detail
                    )
                return result.reply
        return self._accept(envelope, _Rcpt(address, prospect))

    def _accept(self, envelope: RelayEnvelope, rcpt: _Rcpt) -> str:
        envelope.rcpt_tos.append(rcpt.address)
        envelope.recipients.append(rcpt)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: RelaySession, session: Any, envelope: RelayEnvelope) -> str:
        """Deliver one copy per recipient; 250 only once every allowed one is accepted."""
        server.busy = True
        # The transfer timer must not cut off the upstream deliveries.
        server.rearm_timeout(self.settings.data_timeout + self.settings.command_timeout)
        try:
            return await self._data(envelope)
        finally:
            server.busy = False
            server.rearm_timeout(self.settings.command_timeout)

    async def _data(self, envelope: RelayEnvelope) -> str:
        raw = envelope.original_content or b""
        where = (
            await asyncio.to_thread(bare_line_break, raw)
            if len(raw) > BIG_MESSAGE
            else bare_line_break(raw)
        )
        if where is not None:
            return reply_line(
                "550 5.5.2",
                f"bare CR or LF at byte {where} of the message: lines must end with CRLF "
                "(refused as an SMTP smuggling risk)",
            )
        inbound = [r for r in envelope.recipients if r.prospect is None]
        prospects = [r for r in envelope.recipients if r.prospect is not None]
        results: list[RecipientResult] = []
        if prospects:
            # Plain header blocks (nearly all mail) are read on the byte level and the message
            # is composed as bytes (rawmime); anything else is parsed by the email package, in
            # a worker thread when big so that other sessions keep being answered meanwhile.
            message: EmailMessage | RawHeaders | None = scan_headers(raw)
            if message is not None and "Message-ID" in message and not message.get("Message-ID"):
                message = None  # an empty Message-ID is replaced, on the email-package path
            if message is None:
                try:
                    message = (
                        await asyncio.to_thread(parse_message, raw)
                        if len(raw) > BIG_MESSAGE
                        else parse_message(raw)
                    )
                except InvalidMessageError as exc:
                    return reply_line("554 5.6.0", str(exc))
            refs = {str(v).strip() for v in message.get_all("X-Prospect-Campaign") or []}
            campaign, refusal = await self._bind_at_data(envelope, refs)
            if refusal is not None:
                if not inbound:
                    return refusal
                results += [RecipientResult(r.address, "refused", refusal) for r in prospects]
            else:
                assert campaign is not None
                results += await self._deliver(envelope, message, campaign, prospects, raw)
        if inbound:
            results += await asyncio.gather(*(self._inbound(r.address, raw) for r in inbound))
        reply, refused = message_reply(results)
        if refused and envelope.mail_from not in (None, "", "<>"):
            try:
                await self.dsn_transport.send(
                    build_dsn(
                        original=raw,
                        envelope_sender=envelope.mail_from,
                        refused=refused,
                        reporting_host=self.settings.hostname,
                    ),
                    sender="",
                    recipients=[envelope.mail_from],
                )
            except Exception as exc:  # any failure: the client must keep the message
                log.warning("DSN to the sender failed, asking for a retry: %s", exc)
                return reply_line(REPLY_TEMPORARY, f"could not notify the sender: {exc}")
        return reply

    async def _bind_at_data(
        self, envelope: RelayEnvelope, refs: set[str]
    ) -> tuple[Campaign | None, str | None]:
        """The campaign named by the message's ``X-Prospect-Campaign`` values (``refs``) or
        bound at MAIL FROM, or the reply refusing the message."""
        campaign = envelope.campaign
        if len(refs) > 1:
            return None, reply_line("550 5.7.1", "RELAY_CAMPAIGN_MISMATCH: several campaigns")
        if refs:
            (ref,) = refs
            try:
                named = await self._campaign(ref)
            except StoreError as exc:
                return None, reply_line(REPLY_TEMPORARY, f"store unavailable: {exc}")
            if named is None:
                return None, reply_line(
                    "550 5.7.1", f"RELAY_UNKNOWN_CAMPAIGN: campaign {ref!r} is not registered"
                )
            if campaign is not None and (campaign.id, campaign.step) != (named.id, named.step):
                return None, reply_line(
                    "550 5.7.1",
                    f"RELAY_CAMPAIGN_MISMATCH: X-Prospect-Campaign {ref!r} differs from the "
                    f"campaign bound to this {envelope.bound_by}",
                )
            campaign = named
        if campaign is None:
            return None, reply_line(
                "550 5.7.1",
                "RELAY_NO_CAMPAIGN: name a registered campaign in X-Prospect-Campaign, or map "
                "the sender or AUTH user to one in the relay settings",
            )
        return campaign, None

    async def _deliver(
        self,
        envelope: RelayEnvelope,
        message: EmailMessage | RawHeaders,
        campaign: Campaign,
        rcpts: list[_Rcpt],
        raw: bytes,
    ) -> list[RecipientResult]:
        ids = message.get_all("Message-ID") or []
        message_id = str(ids[0]).strip() if ids else ""
        added: str | None = None
        if not message_id:
            # Derived from the bytes, so the client's retry of this message gets the same key.
            message_id = f"<{hashlib.sha256(raw).hexdigest()[:32]}@{self.settings.hostname}>"
            added = message_id
        to_send: EmailMessage | RawMessage
        if isinstance(message, RawHeaders):
            to_send = RawMessage(raw, message_id=added, headers=message)
        else:
            to_send = prepare_relay_message(message, added)
        if added:
            await self._audit(
                AuditEvent(
                    kind="relay",
                    status="message-id-added",
                    campaign_id=campaign.id,
                    step=campaign.step,
                    message_id=message_id,
                    transport="relay",
                    details={"reason": "the client's message had no Message-ID"},
                )
            )
        key = message_id
        if len(key) > 255:
            key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        limit = asyncio.Semaphore(self.settings.concurrency)

        # The claims of this message being delivered by another session right now: a client
        # that hung up during a delivery and came back before it ended. Whether that mail
        # leaves is not known yet, so "delivered by an earlier attempt" could be a 250 for
        # mail that then fails: those recipients are asked to try again. (Checked before
        # this message's own are added: a recipient named twice in it is no such case.)
        claims = [(campaign.id, campaign.step, _recipient_key(r), key) for r in rcpts]
        running = {c for c in claims if c in self._delivering}
        mine = set(claims) - running
        self._delivering |= mine

        async def one(rcpt: _Rcpt, claim: tuple[str, int, str, str]) -> RecipientResult:
            assert rcpt.prospect is not None
            if claim in running:
                return RecipientResult(
                    rcpt.address,
                    "temporary",
                    reply_line(
                        REPLY_TEMPORARY,
                        f"<{rcpt.address}>: an earlier attempt of this message is still being "
                        "delivered; try again later",
                    ),
                )
            async with limit:
                try:
                    outcome = await self.mailer.send(
                        rcpt.prospect, campaign, message=to_send, message_key=key
                    )
                except InvalidInputError as exc:
                    return RecipientResult(
                        rcpt.address, "refused", reply_line("554 5.6.0", str(exc))
                    )
            return recipient_result(rcpt.address, outcome)

        try:
            if len(rcpts) == 1:  # nearly all relayed mail: no task to spawn
                return [await one(rcpts[0], claims[0])]
            return list(await asyncio.gather(*map(one, rcpts, claims)))
        finally:
            self._delivering -= mine

    async def _inbound(self, address: str, raw: bytes) -> RecipientResult:
        assert self.inbound is not None  # refused at RCPT otherwise
        try:
            answer = await self.inbound(self.optout, address, raw)
        except Exception as exc:  # the objection must not be lost: ask for a retry
            log.error("inbound handler failed for an opt-out/bounce address: %s", exc)
            return RecipientResult(address, "temporary", reply_line(REPLY_TEMPORARY, str(exc)))
        return inbound_result(address, answer.accepted, answer.reply)
