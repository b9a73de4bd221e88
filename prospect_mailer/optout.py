"""Objections: every way to opt out writes the same suppression list (DESIGN.md).

The web page, the RFC 8058 one-click POST, the ``unsubscribe+TOKEN@`` mailto address, hard
bounces and complaints all end here. The suppression entry and its audit record are committed
*before* the caller answers (FR_OPTOUT_HONOUR_PROMPTLY): any send checked after that moment is
refused. A forged or altered token changes nothing (:class:`~prospect_mailer.errors.TokenError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from .errors import TokenError
from .models import SuppressionReason
from .store import AuditEvent, Store
from .tokens import TokenSigner, UnsubscribeToken

__all__ = ["OptOutResult", "OptOutService"]

Scope = Literal["global", "advertiser", "campaign"]
Channel = Literal["web", "one-click", "mailto", "bounce", "complaint", "cli", "api"]


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
    """

    recipient_hash: str
    advertiser_id: str
    campaign_id: str
    scope: str
    scope_value: str
    newly_added: bool
    locale: str
    latency_ms: float


class OptOutService:
    """Turns a verified token into a suppression entry plus its audit record.

    Args:
        store: the shared store.
        signer: verifies HTTPS and short (mailto/VERP) tokens.
        clock: current UTC time.
    """

    def __init__(
        self,
        store: Store,
        signer: TokenSigner,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock

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
    ) -> OptOutResult:
        """Suppress the recipient of the send named by a short (mailto/VERP) token.

        Raises:
            TokenError: the token does not verify, or names no known send.
            StoreError: the store failed.
        """
        started = time.perf_counter() if received_at is None else received_at
        prefix = self.signer.verify_short(short)
        claim = await self.store.claims.by_send_id(prefix)
        if claim is None:
            raise TokenError("the token names no send known to this store")
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
        )

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
        )
