"""Objections: every way to opt out writes the same suppression list (DESIGN.md).

The web page, the RFC 8058 one-click POST, the ``unsubscribe+TOKEN@`` mailto address, hard
bounces and complaints all end here. The suppression entry and its audit record are committed
*before* the caller answers (FR_OPTOUT_HONOUR_PROMPTLY): any send checked after that moment is
refused. A forged or altered token changes nothing (:class:`~prospect_mailer.errors.TokenError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .errors import ConfigError, TokenError
from .models import SuppressionReason
from .store import AuditEvent, Store
from .store.claims import ClaimRecord
from .tokens import TokenSigner, UnsubscribeToken

__all__ = ["DEFAULT_SOFT_BOUNCE_LIMIT", "OptOutResult", "OptOutService", "SoftBounceTally"]

Scope = Literal["global", "advertiser", "campaign"]
Channel = Literal["web", "one-click", "mailto", "bounce", "complaint", "cli", "api"]

#: Soft bounces (for distinct sends, none delivered in between) that suppress an address.
DEFAULT_SOFT_BOUNCE_LIMIT = 3


@dataclass(frozen=True, slots=True)
class OptOutResult:
    """What an objection did.

    Attributes:
        recipient_hash: the key of the address that objected.
        advertiser_id: the controller the objection is addressed to.
        campaign_id: the campaign the link or message came from.
        scope, scope_value: the suppression written (``advertiser``/id by default).
        newly_added: ``False`` when the entry already existed (idempotent repeat).
        locale: the language the confirmation should be shown in.
        latency_ms: from receiving the request to the commit of the suppression entry.
        send_id: the send a short (mailto/VERP) token named; ``""`` for an HTTPS token.
    """

    recipient_hash: str
    advertiser_id: str
    campaign_id: str
    scope: str
    scope_value: str
    newly_added: bool
    locale: str
    latency_ms: float
    send_id: str = ""


@dataclass(frozen=True, slots=True)
class SoftBounceTally:
    """What a soft bounce did (:meth:`OptOutService.soft_bounce`).

    Attributes:
        send_id: the send that bounced.
        consecutive: soft-bounced sends since the last reset, this one included.
        suppressed: the suppression written when ``consecutive`` reached the limit, else ``None``.
    """

    send_id: str
    consecutive: int
    suppressed: OptOutResult | None


class OptOutService:
    """Turns a verified token into a suppression entry plus its audit record.

    Args:
        store: the shared store.
        signer: verifies HTTPS and short (mailto/VERP) tokens.
        clock: current UTC time.
        soft_bounce_limit: soft-bounced sends in a row that suppress the address.
    """

    def __init__(
        self,
        store: Store,
        signer: TokenSigner,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        soft_bounce_limit: int = DEFAULT_SOFT_BOUNCE_LIMIT,
    ) -> None:
        if soft_bounce_limit < 1:
            raise ConfigError("soft_bounce_limit must be at least 1")
        self.store = store
        self.signer = signer
        self.clock = clock
        self.soft_bounce_limit = soft_bounce_limit

    def verify(self, token: str) -> UnsubscribeToken:
        """Check an HTTPS token without changing anything (for the confirmation page).

        Raises:
            TokenError: forged, altered, truncated or unknown key.
        """
        return self.signer.verify(token)

    async def unsubscribe(
        self,
        token: str,
        *,
        channel: Channel,
        narrow_to_campaign: bool = False,
        received_at: float | None = None,
    ) -> OptOutResult:
        """Suppress the recipient named by an HTTPS token.

        Args:
            token: the token from the unsubscribe URL.
            channel: how it arrived (``one-click``, ``web``...), recorded in the audit.
            narrow_to_campaign: the person chose the narrower "this campaign only" option;
                the default is every prospecting message from the advertiser.
            received_at: ``time.perf_counter()`` when the request arrived (for the latency).

        Raises:
            TokenError: the token does not verify; nothing is written.
            StoreError: the store failed; the caller must not confirm.
        """
        started = time.perf_counter() if received_at is None else received_at
        tok = self.signer.verify(token)
        scope: Scope = "campaign" if narrow_to_campaign else "advertiser"
        value = tok.campaign_id if narrow_to_campaign else tok.advertiser_id
        return await self._suppress(
            tok.recipient_hash,
            advertiser_id=tok.advertiser_id,
            campaign_id=tok.campaign_id,
            scope=scope,
            scope_value=value,
            reason="unsubscribe",
            channel=channel,
            locale=tok.locale,
            token_id=self.signer.token_id(token),
            started=started,
        )

    async def from_short_token(
        self,
        short: str,
        *,
        channel: Channel,
        reason: SuppressionReason = "unsubscribe",
        received_at: float | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> OptOutResult:
        """Suppress the recipient of the send named by a short (mailto/VERP) token.

        ``details`` (e.g. a bounce's status codes) are added to the audit record.

        Raises:
            TokenError: the token does not verify, or names no known send.
            StoreError: the store failed.
        """
        started = time.perf_counter() if received_at is None else received_at
        claim = await self.resolve_short(short)
        return await self._suppress(
            claim.recipient_hash,
            advertiser_id=claim.advertiser_id,
            campaign_id=claim.campaign_id,
            scope="global" if reason in ("hard_bounce", "complaint") else "advertiser",
            scope_value="" if reason in ("hard_bounce", "complaint") else claim.advertiser_id,
            reason=reason,
            channel=channel,
            locale="",
            token_id=self.signer.token_id(short),
            started=started,
            send_id=claim.send_id,
            extra=details,
        )

    async def resolve_short(self, short: str) -> ClaimRecord:
        """The send named by a short (mailto/VERP) token, without changing anything.

        Raises:
            TokenError: the token does not verify, or names no known send.
            StoreError: the store failed.
        """
        claim = await self.store.claims.by_send_id(self.signer.verify_short(short))
        if claim is None:
            raise TokenError("the token names no send known to this store")
        return claim

    async def note(
        self,
        claim: ClaimRecord | None,
        *,
        kind: str,
        status: str,
        channel: Channel,
        details: Mapping[str, Any],
    ) -> None:
        """Record an inbound event that suppresses nothing (a review item, a delivery report).

        Args:
            claim: the send it is about, when known.
            kind, status: audit kind and status (``inbound``/``review``, ``bounce``/``soft``...).
            channel: how it arrived.
            details: identifiers and parse results only (never a body or an address).

        Raises:
            StoreError: the store failed; the caller must not acknowledge the message.
        """
        await self.store.audit.append(
            [
                AuditEvent(
                    kind=kind,
                    status=status,
                    send_id=claim.send_id if claim else "",
                    campaign_id=claim.campaign_id if claim else None,
                    step=claim.step if claim else None,
                    advertiser_id=claim.advertiser_id if claim else None,
                    recipient_hash=claim.recipient_hash if claim else None,
                    transport=channel,
                    details=dict(details),
                )
            ]
        )

    async def soft_bounce(
        self,
        short: str,
        *,
        details: Mapping[str, Any],
        received_at: float | None = None,
    ) -> SoftBounceTally:
        """Count a soft bounce; suppress (reason ``hard_bounce``) at the limit.

        The event is appended first, then the recipient's audit trail is read back, so of two
        concurrent bounces the later append sees both. The count is of distinct sends with a
        soft bounce since the last reset (a ``delivered`` report or a removed entry): several
        "delayed" notices for one message count once.

        Raises:
            TokenError: the token does not verify, or names no known send.
            StoreError: the store failed.
        """
        started = time.perf_counter() if received_at is None else received_at
        claim = await self.resolve_short(short)
        await self.note(claim, kind="bounce", status="soft", channel="bounce", details=details)
        sends: set[str] = set()
        for record in reversed(await self.store.audit.events(recipient_hash=claim.recipient_hash)):
            if (record.kind, record.status) in (
                ("bounce", "delivered"),
                ("suppression", "removed"),
            ):
                break
            if (record.kind, record.status) == ("bounce", "soft"):
                sends.add(record.send_id)
        suppressed = None
        if len(sends) >= self.soft_bounce_limit:
            suppressed = await self._suppress(
                claim.recipient_hash,
                advertiser_id=claim.advertiser_id,
                campaign_id=claim.campaign_id,
                scope="global",
                scope_value="",
                reason="hard_bounce",
                channel="bounce",
                locale="",
                token_id=self.signer.token_id(short),
                started=started,
                send_id=claim.send_id,
                extra={"trigger": "soft_bounce_limit", "soft_bounces": len(sends)},
            )
        return SoftBounceTally(claim.send_id, len(sends), suppressed)

    async def _suppress(
        self,
        recipient_hash: str,
        *,
        advertiser_id: str,
        campaign_id: str,
        scope: Scope,
        scope_value: str,
        reason: SuppressionReason,
        channel: Channel,
        locale: str,
        token_id: str,
        started: float,
        send_id: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> OptOutResult:
        added = await self.store.suppression.add_hashes(
            [recipient_hash],
            kind="address",
            scope=scope,
            scope_value=scope_value,
            reason=reason,
            source=channel,
        )
        latency_ms = (time.perf_counter() - started) * 1000
        await self.store.audit.append(
            [
                AuditEvent(
                    kind="suppression",
                    status="added" if added else "repeated",
                    send_id=send_id,
                    campaign_id=campaign_id,
                    advertiser_id=advertiser_id,
                    recipient_hash=recipient_hash,
                    transport=channel,
                    details={
                        **(extra or {}),
                        "scope": scope,
                        "scope_value": scope_value,
                        "reason": reason,
                        "token_id": token_id,
                        # The entry is committed: every send checked from now on is refused.
                        "effective_at": self.clock().isoformat(),
                        "latency_ms": round(latency_ms, 3),
                    },
                )
            ]
        )
        return OptOutResult(
            recipient_hash=recipient_hash,
            advertiser_id=advertiser_id,
            campaign_id=campaign_id,
            scope=scope,
            scope_value=scope_value,
            newly_added=bool(added),
            locale=locale,
            latency_ms=latency_ms,
            send_id=send_id,
        )
