"""Inbound mail: mailto unsubscribes, bounces (RFC 3464) and complaints (RFC 5965).

The relay hands every message for an ``unsubscribe+TOKEN@`` or ``bounce+TOKEN@`` address to
:func:`handle_inbound`, which answers with the SMTP reply to give. The token in the *address* is
what identifies the send (a truncated HMAC over its id, :meth:`TokenSigner.make_short`): nothing
in a report is trusted to say who the recipient was, so a forged report cannot suppress anyone.

* ``unsubscribe+TOKEN@``: any message, whatever its body (an empty mail from a mail client's
  "unsubscribe" button is the common case), suppresses the recipient for the advertiser
  (OPTOUT_MAILTO_INBOUND). The body is not even parsed.
* ``bounce+TOKEN@`` holding a delivery status notification (``multipart/report;
  report-type=delivery-status``): a per-recipient ``Action: failed`` with a ``5.x.x`` status is a
  hard bounce (global suppression, reason ``hard_bounce``); ``Action: delayed``, or ``failed`` with
  a ``4.x.x`` status, is a soft bounce, counted; :attr:`OptOutService.soft_bounce_limit`
  soft-bounced sends in a row suppress (reason ``hard_bounce``). Several "delayed" notices for
  one message count once. An ``Action: delivered``/``relayed``/``expanded`` report resets the
  count; accepted-by-upstream does not (it says nothing about the final mailbox).
* ``bounce+TOKEN@`` holding an abuse report (``report-type=feedback-report``, ``Feedback-Type:
  abuse``): a complaint, global suppression with reason ``complaint``
  (MBP_COMPLAINT_CIRCUIT_BREAKER).
  ``not-spam`` is recorded and ignored; other feedback types go to review.
* Anything else at ``bounce+TOKEN@`` (an auto-reply, a human reply, a non-standard bounce) is
  accepted and recorded in the audit log as ``inbound``/``review`` for a human: never silently
  eaten (GDPR_ART21_OBJECTION_ABSOLUTE: unparsed replies go to a review queue).

Replies: ``250`` once the suppression or audit record is committed; ``550 5.7.1`` for a token
that does not verify or names no known send (nothing changes); ``550 5.6.0`` for a report whose
headers could inject lines (CVE-2024-6923, :func:`~prospect_mailer.mime.check_headers_safe`);
``451 4.3.0`` when the store fails, so the sending server keeps the message and retries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import quopri
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import default as default_policy
from typing import Any, Literal

from .errors import InvalidMessageError, StoreError, TokenError
from .mime import check_headers_safe
from .optout import OptOutService

__all__ = [
    "InboundKind",
    "InboundResult",
    "Report",
    "handle_inbound",
    "inbound_route",
    "parse_report",
]

InboundKind = Literal["unsubscribe", "hard_bounce", "soft_bounce", "complaint", "ignored", "review"]
ReportKind = Literal["hard_bounce", "soft_bounce", "complaint", "delivered", "ignored", "review"]

_ROUTE = re.compile(r"(unsubscribe|bounce)\+([A-Za-z2-7]{1,64})@[^@\s]+")
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ARF_TYPE = "message/feedback-report"
_DELIVERED = frozenset({"delivered", "relayed", "expanded"})
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class InboundResult:
    """What :func:`handle_inbound` did and what the relay should answer.

    Attributes:
        accepted: ``True``: answer ``reply`` (a 250) after DATA; ``False``: refuse with ``reply``.
        reply: a full SMTP reply line, e.g. ``"250 2.0.0 unsubscribed"``.
        kind: ``unsubscribe``, ``hard_bounce``, ``soft_bounce``, ``complaint``, ``ignored`` or
            ``review``.
        suppressed: a suppression entry was written (or already existed) by this message.
        send_id: the send the token names, when it was resolved.
        detail: a short human-readable explanation (for logs; never an address).
        latency_ms: for suppressions, from the call to the commit of the entry.
    """

    accepted: bool
    reply: str
    kind: InboundKind
    suppressed: bool = False
    send_id: str = ""
    detail: str = ""
    latency_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """A parsed delivery or feedback report (:func:`parse_report`).

    Attributes:
        kind: ``hard_bounce``, ``soft_bounce``, ``complaint``, ``delivered``, ``ignored`` or
            ``review``.
        reason: why it was classified so (for the audit and for a human reviewing it).
        facts: identifiers safe to keep in the audit log (statuses, actions, feedback type,
            the report's Message-ID, its size and SHA-256); never a body or an address.
    """

    kind: ReportKind
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)


def inbound_route(rcpt: str) -> tuple[Literal["unsubscribe", "bounce"], str] | None:
    """``("unsubscribe" | "bounce", token)`` for an inbound address, else ``None``.

    The relay may use this at ``RCPT TO`` to accept these addresses without authentication
    (and only these). The local-part prefix is matched case-insensitively; the token is checked
    later, by :func:`handle_inbound`.
    """
    head, plus, rest = rcpt.strip().strip("<>").partition("+")
    # Case-fold only the fixed prefix: the token is base32 and its check folds case anyway.
    m = _ROUTE.fullmatch(head.lower() + plus + rest)
    if m is None:
        return None
    what: Literal["unsubscribe", "bounce"] = (
        "unsubscribe" if m.group(1) == "unsubscribe" else "bounce"
    )
    return what, m.group(2)


async def handle_inbound(optout: OptOutService, rcpt: str, data: bytes) -> InboundResult:
    """Process one message received for an inbound address (see the module docstring).

    Args:
        optout: the shared objection service (store + signer).
        rcpt: the envelope recipient (``unsubscribe+TOKEN@domain`` or ``bounce+TOKEN@domain``).
        data: the message as received (DATA content).

    Returns:
        The outcome and the SMTP reply line to give; never raises for bad input or a store
        failure (those are replies too).
    """
    received = time.perf_counter()
    routed = inbound_route(rcpt)
    if routed is None:
        return InboundResult(False, "550 5.1.1 no such inbound address", "ignored")
    what, token = routed
    try:
        optout.signer.verify_short(token)
    except TokenError as exc:
        kind: InboundKind = "unsubscribe" if what == "unsubscribe" else "ignored"
        return InboundResult(False, "550 5.7.1 unknown token", kind, detail=str(exc))
    try:
        if what == "unsubscribe":
            done = await optout.from_short_token(
                token, channel="mailto", reason="unsubscribe", received_at=received
            )
            return InboundResult(
                True,
                "250 2.0.0 unsubscribed",
                "unsubscribe",
                suppressed=True,
                send_id=done.send_id,
                detail=f"{done.scope} {done.scope_value}".strip(),
                latency_ms=done.latency_ms,
            )
        return await _bounce(optout, token, data, received)
    except TokenError as exc:
        return InboundResult(False, "550 5.7.1 unknown token", "ignored", detail=str(exc))
    except StoreError as exc:
        # Fail closed but lose nothing: the sending server keeps the message and retries.
        return InboundResult(
            False, "451 4.3.0 temporary failure, try again later", "ignored", detail=str(exc)
        )


async def _bounce(optout: OptOutService, token: str, data: bytes, received: float) -> InboundResult:
    try:
        report = parse_report(data)
    except InvalidMessageError as exc:
        return InboundResult(False, "550 5.6.0 message headers refused", "ignored", detail=str(exc))
    if report.kind == "hard_bounce" or report.kind == "complaint":
        channel: Literal["bounce", "complaint"] = (
            "bounce" if report.kind == "hard_bounce" else "complaint"
        )
        done = await optout.from_short_token(
            token, channel=channel, reason=report.kind, received_at=received, details=report.facts
        )
        what = "hard bounce" if report.kind == "hard_bounce" else "complaint"
        return InboundResult(
            True,
            f"250 2.0.0 {what} recorded, address suppressed",
            report.kind,
            suppressed=True,
            send_id=done.send_id,
            detail=report.reason,
            latency_ms=done.latency_ms,
        )
    if report.kind == "soft_bounce":
        tally = await optout.soft_bounce(token, details=report.facts, received_at=received)
        limit = optout.soft_bounce_limit
        suffix = ", address suppressed" if tally.suppressed else ""
        return InboundResult(
            True,
            f"250 2.0.0 soft bounce {tally.consecutive}/{limit} counted{suffix}",
            "soft_bounce",
            suppressed=tally.suppressed is not None,
            send_id=tally.send_id,
            detail=report.reason,
            latency_ms=tally.suppressed.latency_ms if tally.suppressed else None,
        )
    claim = await optout.resolve_short(token)
    if report.kind == "delivered":
        await optout.note(
            claim, kind="bounce", status="delivered", channel="bounce", details=report.facts
        )
        return InboundResult(
            True,
            "250 2.0.0 delivery report noted",
            "ignored",
            send_id=claim.send_id,
            detail=report.reason,
        )
    if report.kind == "ignored":
        await optout.note(
            claim, kind="inbound", status="ignored", channel="bounce", details=report.facts
        )
        return InboundResult(
            True, "250 2.0.0 report noted", "ignored", send_id=claim.send_id, detail=report.reason
        )
    facts = {**report.facts, "reason": report.reason}
    await optout.note(claim, kind="inbound", status="review", channel="bounce", details=facts)
    return InboundResult(
        True, "250 2.0.0 queued for review", "review", send_id=claim.send_id, detail=report.reason
    )


def parse_report(data: bytes) -> Report:
    """Classify a message received at a VERP address (pure; the stdlib email package only).

    Raises:
        InvalidMessageError: its headers could inject lines when re-serialised (refuse it).
    """
    facts: dict[str, Any] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        msg = BytesParser(policy=default_policy).parsebytes(data)
    except Exception as exc:  # the parser is lenient; anything it raises is a review item
        return Report("review", f"unparseable message: {type(exc).__name__}", facts)
    check_headers_safe(msg)
    message_id = _text(msg.get("Message-ID", ""))
    if message_id:
        facts["message_id"] = message_id
    try:
        return _classify(msg, facts)
    except Exception as exc:  # a malformed report is for a human, never silently dropped
        return Report("review", f"malformed report: {type(exc).__name__}", facts)


def _classify(msg: EmailMessage, facts: dict[str, Any]) -> Report:
    report_part = next(
        (p for p in _report_parts(msg) if p.get_content_type() in (*_DSN_TYPES, _ARF_TYPE)), None
    )
    if report_part is None:
        return Report("review", "not a delivery status or feedback report", facts)
    blocks = _field_blocks(report_part)
    if report_part.get_content_type() == _ARF_TYPE:
        return _classify_arf(blocks, facts)
    return _classify_dsn(blocks, facts)


def _classify_arf(blocks: list[Message], facts: dict[str, Any]) -> Report:
    if not blocks:
        return Report("review", "empty feedback report", facts)
    feedback = _text(blocks[0].get("Feedback-Type", "")).lower()
    facts["feedback_type"] = feedback
    if feedback == "abuse":
        return Report("complaint", "ARF abuse report", facts)
    if feedback == "not-spam":
        return Report("ignored", "ARF not-spam report", facts)
    return Report("review", f"ARF feedback type {feedback or 'missing'!r}", facts)


def _classify_dsn(blocks: list[Message], facts: dict[str, Any]) -> Report:
    if blocks:
        mta = _text(blocks[0].get("Reporting-MTA", ""))
        if mta:
            facts["reporting_mta"] = mta
    recipients = blocks[1:]
    actions: list[str] = []
    statuses: list[str] = []
    for block in recipients:
        actions.append(_text(block.get("Action", "")).lower())
        m = _STATUS.match(_text(block.get("Status", "")))
        statuses.append(m.group(0) if m else "")
        diagnostic = _text(block.get("Diagnostic-Code", ""))
        if diagnostic:
            facts.setdefault("diagnostic", diagnostic)
    facts["actions"], facts["statuses"] = actions, statuses
    pairs = list(zip(actions, statuses, strict=True))
    if not pairs:
        return Report("review", "delivery status report without a recipient block", facts)
    if any(a == "failed" and s.startswith("5") for a, s in pairs):
        return Report("hard_bounce", "DSN: failed with a permanent (5.x.x) status", facts)
    if any(a == "delayed" or (a == "failed" and s.startswith("4")) for a, s in pairs):
        return Report(
            "soft_bounce", "DSN: delayed or failed with a transient (4.x.x) status", facts
        )
    if all(a in _DELIVERED for a in actions):
        return Report("delivered", "DSN: delivered", facts)
    return Report("review", "DSN with unknown actions or statuses", facts)


def _report_parts(part: EmailMessage) -> Iterator[EmailMessage]:
    """The parts of a message, not descending into attached messages (the returned original)."""
    yield part
    if part.get_content_type() in _DSN_TYPES or part.get_content_type() == _ARF_TYPE:
        return
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.iter_parts():
            assert isinstance(child, EmailMessage)  # parsed with policy.default
            yield from _report_parts(child)


def _field_blocks(part: EmailMessage) -> list[Message]:
    """The header-like field blocks of a report part, whatever its transfer encoding."""
    raw = part.as_bytes(policy=default_policy).replace(b"\r\n", b"\n")
    _head, _sep, body = raw.partition(b"\n\n")
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte == "base64":
        try:
            body = base64.b64decode(body, validate=False)
        except (binascii.Error, ValueError):
            return []
    elif cte == "quoted-printable":
        body = quopri.decodestring(body)
    body = body.replace(b"\r\n", b"\n")
    parser = BytesHeaderParser(policy=default_policy)
    blocks = [b for b in re.split(rb"\n[ \t]*\n", body.strip(b"\n")) if b.strip()]
    return [parser.parsebytes(b + b"\n\n") for b in blocks]


def _text(value: object) -> str:
    """A header value as one short line (reports are hostile input)."""
    return " ".join(str(value).split())[:_MAX_TEXT]
