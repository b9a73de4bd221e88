"""Direct composition of the library's own messages as wire bytes (the fast path).

A campaign message built from templates needs no parse / inject / re-serialise round trip:
its footers are joined to the rendered bodies as strings, with the very functions the
compliance step uses on arbitrary MIME (:func:`~prospect_mailer.mime.append_text_footer`,
:func:`~prospect_mailer.mime.insert_html_footer`), and the MIME structure is written once.
Python's :mod:`email` package spends about a millisecond per message on header objects and
deep copies; this writes the same structure in tens of microseconds. Messages that come from
elsewhere (the relay) still go through :func:`~prospect_mailer.compliance.apply_compliance`.

The output is checked against the slow path by tests (same headers, same decoded parts).
"""

from __future__ import annotations

import binascii
import secrets
from datetime import datetime
from email.header import Header
from email.policy import SMTP
from email.utils import formataddr

from .compliance import LIST_UNSUBSCRIBE_POST, RenderedFooters, build_list_unsubscribe
from .errors import InvalidMessageError
from .mime import CommaFoldedHeader, append_text_footer, date_value, insert_html_footer

__all__ = ["compose_bytes"]

_CRLF = "\r\n"


def _header_text(name: str, value: str) -> str:
    """``Name: value`` with RFC 2047 encoding when needed, folded with CRLF."""
    if any(c in value for c in "\r\n\x00"):
        raise InvalidMessageError(f"{name} must not contain a line break")
    if value.isascii() and len(name) + 2 + len(value) <= 78:
        return f"{name}: {value}"
    encoded = Header(value, "utf-8" if not value.isascii() else "us-ascii", header_name=name)
    return f"{name}: " + encoded.encode(linesep=_CRLF, maxlinelen=78)


def _address(name: str, display: str, addr: str) -> str:
    if any(c in display + addr for c in "\r\n\x00"):
        raise InvalidMessageError(f"{name} must not contain a line break")
    display = " ".join(display.split())  # any Unicode white space run becomes one space
    value = formataddr((display, addr), charset="utf-8") if display else addr
    return f"{name}: {value}"


def _qp(text: str) -> bytes:
    """UTF-8 quoted-printable with CRLF line ends (binascii: C speed)."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    return binascii.b2a_qp(data, quotetabs=False, istext=True).replace(b"\n", b"\r\n")


def _part(subtype: str, body: str) -> bytes:
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"{_CRLF}'
        f"Content-Transfer-Encoding: quoted-printable{_CRLF}{_CRLF}"
    ).encode("ascii")
    payload = _qp(body)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return head + payload


def compose_bytes(
    *,
    from_name: str,
    from_address: str,
    to_name: str,
    to_address: str,
    subject: str,
    reply_to: str | None,
    message_id: str,
    now: datetime,
    text: str | None,
    html: str | None,
    footers: RenderedFooters,
    list_unsubscribe_url: str,
    list_unsubscribe_mailto: str | None,
) -> bytes:
    """Write a complete message (CRLF wire form) with both footers and the RFC 8058 headers.

    Raises:
        InvalidMessageError: a header value with a line break, neither body given, or an
            unsubscribe URI the compliance rules refuse.
    """
    if text is None and html is None:
        raise InvalidMessageError("a message needs a text or an HTML body")
    lu = CommaFoldedHeader(
        "List-Unsubscribe", build_list_unsubscribe(list_unsubscribe_url, list_unsubscribe_mailto)
    )
    lines = [
        _address("From", from_name, from_address),
        _address("To", to_name, to_address),
        _header_text("Subject", subject),
        f"Date: {date_value(now)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
    ]
    if reply_to:
        lines.append(_address("Reply-To", "", reply_to))
    lines.append(lu.fold(policy=SMTP).rstrip("\r\n"))
    lines.append(f"List-Unsubscribe-Post: {LIST_UNSUBSCRIBE_POST}")
    parts: list[bytes] = []
    if text is not None:
        parts.append(_part("plain", append_text_footer(text, footers.text)))
    if html is not None:
        parts.append(_part("html", insert_html_footer(html, footers.html)))
    if len(parts) == 1:
        head = (_CRLF.join(lines) + _CRLF).encode("utf-8")
        return head + parts[0]
    boundary = "=_pm_" + secrets.token_hex(12)
    lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    out = [(_CRLF.join(lines) + _CRLF + _CRLF).encode("utf-8")]
    for part in parts:
        out.append(f"--{boundary}{_CRLF}".encode("ascii"))
        out.append(part)
    out.append(f"--{boundary}--{_CRLF}".encode("ascii"))
    return b"".join(out)
