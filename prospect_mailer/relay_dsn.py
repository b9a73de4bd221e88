"""Delivery status notifications (RFC 3464) for recipients the relay refused after ``DATA``.

Pure: builds the message; the relay sends it to the envelope sender with a null sender
(``MAIL FROM:<>``, RFC 5321 4.5.5), so a DSN never causes another DSN.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

from .mime import parse_message
from .relay_replies import RecipientResult

__all__ = ["build_dsn"]


def build_dsn(
    *,
    original: bytes,
    envelope_sender: str,
    refused: Sequence[RecipientResult],
    reporting_host: str,
    now: datetime | None = None,
) -> EmailMessage:
    """A ``multipart/report; report-type=delivery-status`` naming each refused recipient.

    Args:
        original: the message as received (its header block is returned to the sender).
        envelope_sender: who gets the DSN.
        refused: the recipients not delivered, with their reply and rule ids.
        reporting_host: the relay's host name (``Reporting-MTA``).
        now: the arrival time (default: now).
    """
    when = format_datetime(now or datetime.now(UTC))
    boundary = f"=_dsn_{uuid.uuid4().hex}"
    lines = [
        "This is the prospect-mailer relay. Your message was delivered to the other",
        "recipients, but NOT to the following, because a prospecting rule or the",
        "receiving server refused it:",
        "",
    ]
    for r in refused:
        why = f"blocked by {', '.join(r.rule_ids)}" if r.rule_ids else "refused"
        lines += [f"  <{r.address}>: {why}", f"    {r.reply}", ""]
    lines.append("Rule ids are explained in the prospect-mailer rule catalogue (RULES.md).")
    status_blocks = [f"Reporting-MTA: dns; {reporting_host}\nArrival-Date: {when}"]
    for r in refused:
        status = r.reply.split(" ")[1] if r.reply[4:5].isdigit() else f"{r.reply[0]}.0.0"
        status_blocks.append(
            f"Final-Recipient: rfc822; {r.address}\n"
            f"Action: failed\n"
            f"Status: {status}\n"
            f"Diagnostic-Code: smtp; {r.reply}"
        )
    head = original.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    text = "\n".join(
        [
            "From: Mail Delivery System <mailer-daemon@" + reporting_host + ">",
            f"To: <{envelope_sender}>",
            "Subject: Undelivered Mail Returned to Sender (prospecting rules)",
            f"Date: {when}",
            f"Message-ID: <dsn.{uuid.uuid4().hex}@{reporting_host}>",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
            "",
            f"--{boundary}",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            *lines,
            "",
            f"--{boundary}",
            "Content-Type: message/delivery-status",
            "",
            "\n\n".join(status_blocks),
            "",
            f"--{boundary}",
            "Content-Type: text/rfc822-headers; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            head,
            "",
            f"--{boundary}--",
            "",
        ]
    )
    return parse_message(text.encode("utf-8"))
