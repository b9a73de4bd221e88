"""SMTP replies of the relay: pipeline outcomes become reply codes here, and only here.

Pure (no I/O). :func:`recipient_result` turns one :class:`~prospect_mailer.models.Outcome` (a dry
run at ``RCPT TO`` or a send at ``DATA``) into a :class:`RecipientResult`; :func:`message_reply`
turns the results of every recipient of a message into the one reply to ``DATA`` plus the
recipients a DSN must name. The mapping, for the README and the tests:

=============================================  =====================================
outcome                                        reply
=============================================  =====================================
sent, duplicate (already delivered)            250 (after *every* recipient is done)
allowed (dry run at RCPT)                      250 2.1.5 at RCPT
blocked                                        550 5.7.1 <rule ids> (RCPT), DSN (DATA)
deferred (upstream down or 4xx)                451 4.3.0 for the whole message
failed, store unavailable                      451 4.3.0 for the whole message
failed, upstream 5xx                           that 5xx (one recipient) or DSN
failed, message cannot be processed            554 5.6.0
=============================================  =====================================

At ``DATA``: any temporary result makes the whole message ``451`` (the client keeps it; the
idempotency key makes the retry deliver each recipient once); otherwise, if nothing was
delivered, the message is rejected (the single refusal as is, or ``550 5.7.1`` when every
recipient was blocked); otherwise ``250`` and a DSN naming each refused recipient.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .models import Outcome

__all__ = [
    "REPLY_RELAY_DENIED",
    "REPLY_SHUTDOWN",
    "REPLY_TEMPORARY",
    "RecipientResult",
    "ResultKind",
    "inbound_result",
    "message_reply",
    "recipient_result",
    "reply_line",
]

ResultKind = Literal["delivered", "duplicate", "accepted", "blocked", "refused", "temporary"]

REPLY_TEMPORARY = "451 4.3.0"
REPLY_RELAY_DENIED = "554 5.7.1"
REPLY_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"

_MAX_TEXT = 400  # an SMTP reply line is at most 512 octets (RFC 5321 4.5.3.1.5)
_CODE = re.compile(r"^([245])\d\d(?:[ -]|$)")


def reply_line(code_and_status: str, text: str) -> str:
    """One reply line: ``"550 5.7.1" + " " + text`` on one line, short enough for SMTP."""
    flat = " ".join(text.split())  # upstream replies and explanations may span lines
    if len(flat) > _MAX_TEXT:
        flat = flat[: _MAX_TEXT - 3] + "..."
    return f"{code_and_status} {flat}".rstrip()


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient, as SMTP sees it.

    Attributes:
        address: the recipient as the client gave it.
        kind: ``delivered``, ``duplicate`` (delivered by an earlier attempt), ``accepted``
            (RCPT only: allowed), ``blocked`` (a rule), ``refused`` (permanent), ``temporary``.
        reply: the full reply line for this recipient (``"550 5.7.1 FR_..."``).
        rule_ids: the rules that blocked it.
    """

    address: str
    kind: ResultKind
    reply: str
    rule_ids: tuple[str, ...] = ()

    @property
    def code(self) -> int:
        """The three-digit reply code."""
        return int(self.reply[:3])

    @property
    def ok(self) -> bool:
        """Delivered now, delivered before, or (at RCPT) allowed."""
        return self.kind in ("delivered", "duplicate", "accepted")


def recipient_result(address: str, outcome: Outcome) -> RecipientResult:
    """Map one pipeline outcome to the recipient's SMTP result (the only such mapping)."""
    status = outcome.status
    if status == "sent":
        return RecipientResult(address, "delivered", reply_line("250 2.0.0", "delivered"))
    if status == "duplicate":
        return RecipientResult(
            address, "duplicate", reply_line("250 2.0.0", "already delivered, not sent again")
        )
    if status == "allowed":
        return RecipientResult(address, "accepted", reply_line("250 2.1.5", "recipient ok"))
    if status == "blocked":
        rules = outcome.rule_ids
        return RecipientResult(
            address,
            "blocked",
            reply_line("550 5.7.1", _blocked_text(rules, outcome.detail)),
            rule_ids=rules,
        )
    if status == "failed" and outcome.smtp_code is not None and outcome.smtp_code >= 500:
        # The upstream refused this recipient for good: pass its own words back.
        text = outcome.smtp_reply or outcome.detail
        return RecipientResult(address, "refused", _as_reply(outcome.smtp_code, text, "5.0.0"))
    if status == "failed" and outcome.detail.startswith("message could not be composed"):
        return RecipientResult(address, "refused", reply_line("554 5.6.0", outcome.detail))
    # deferred, a store failure, or anything unforeseen: temporary, so nothing is lost.
    return RecipientResult(address, "temporary", reply_line(REPLY_TEMPORARY, outcome.detail))


def inbound_result(address: str, accepted: bool, reply: str) -> RecipientResult:
    """Map an inbound (opt-out/bounce) handler's answer to a recipient result."""
    match = _CODE.match(reply)
    if accepted:
        return RecipientResult(address, "delivered", reply if match else reply_line("250", reply))
    if match and match.group(1) == "5":
        return RecipientResult(address, "refused", reply_line(reply[:3], reply[4:]))
    return RecipientResult(address, "temporary", reply_line(REPLY_TEMPORARY, reply))


def _as_reply(code: int, text: str, default_status: str) -> str:
    text = text.strip()
    status = text.split(" ", 1)[0]
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status):
        return reply_line(str(code), text)
    return reply_line(f"{code} {default_status}", text)


def message_reply(results: Sequence[RecipientResult]) -> tuple[str, list[RecipientResult]]:
    """The reply to ``DATA`` for a whole message, and the refused recipients a DSN must name.

    Returns:
        ``(reply, dsn)``: ``dsn`` is non-empty only when the reply is 250 and some recipients
        were refused (blocked at DATA time or refused by the upstream).
    """
    temporary = [r for r in results if r.kind == "temporary"]
    if temporary:
        return reply_line(REPLY_TEMPORARY, temporary[0].reply[10:] or "try again later"), []
    done = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    if not done:
        if len(refused) == 1:
            return refused[0].reply, []
        listing = "; ".join(f"{r.address}: {r.reply}" for r in refused)
        if all(r.kind == "blocked" for r in refused):
            return reply_line("550 5.7.1", f"every recipient blocked: {listing}"), []
        return reply_line("554 5.0.0", f"no recipient accepted: {listing}"), []
    again = sum(r.kind == "duplicate" for r in done)
    summary = f"{len(done)} delivered" + (f" ({again} by an earlier attempt)" if again else "")
    if refused:
        summary += f"; {len(refused)} refused, reported to the sender by a DSN"
    return reply_line("250 2.0.0", summary), refused


def _blocked_text(rules: tuple[str, ...], detail: str) -> str:
    """``RULE: reason; RULE: reason``; the policy's detail already starts with the ids."""
    lines = [line for line in detail.splitlines() if line.strip()]
    if rules and lines and lines[0].startswith(rules[0] + ":"):
        return "; ".join(lines)
    return f"{' '.join(rules)}: {detail}"
