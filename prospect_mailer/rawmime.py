"""The compliance step on the wire bytes of someone else's message (the relay's fast path).

The relay receives a client's message as CRLF bytes. The general path parses it with the
:mod:`email` package, injects the footers (:func:`~prospect_mailer.compliance.apply_compliance`)
and writes it back: about 1.5 ms for a 2 KB message. :func:`apply_compliance_bytes` does the
same job by slicing the bytes: it reads only the header blocks and the text parts it must
change, copies every other byte range as it is, and writes exactly what the general path
writes (``wire_bytes(apply_compliance(...))`` after the relay's own header changes), in tens of
microseconds. Whatever it is not sure to reproduce, it leaves alone: it returns ``None`` and the
caller takes the general path, which also produces the proper error messages.

Handled (byte for byte the output of the general path):

* a top-level ``text/plain`` or ``text/html`` part (no ``Content-Type``: ``text/plain``
  us-ascii), or ``multipart/*`` (mixed, alternative, related..., nested) with a ``boundary``
  parameter, quoted or not; only multipart parts are descended into;
* footers in every ``text/plain`` and ``text/html`` part that is not
  ``Content-Disposition: attachment``, with the rules of :func:`~prospect_mailer.mime.add_footer`:
  any ASCII-compatible charset :func:`codecs.lookup` knows, transfer encodings 7bit, 8bit,
  binary, quoted-printable and base64 (missing: 7bit), a ``text/plain`` part whose charset
  cannot hold the footer re-encoded as UTF-8 (the one case that uses the email package, for
  its ``Content-Type`` line);
* every other part (attachments, images, ``message/rfc822``) copied byte-identical, preamble and
  epilogue kept; a 20 MB attachment is sliced, never decoded;
* the header changes of the relay and of the compliance step: ``X-Prospect-*`` (any case)
  removed, the given Message-ID added when there is none, ``List-Unsubscribe`` and
  ``List-Unsubscribe-Post`` replaced by exactly one of each, ``Message-ID``, ``Date`` and
  ``MIME-Version`` added when missing, the sender named (:func:`prospect_mailer.compose.
  _name_the_sender`), ``Bcc``/``Resent-Bcc`` dropped (:func:`~prospect_mailer.transport.
  wire_bytes`).

Left to the general path (``None``), among others: a bare CR or LF anywhere; non-ASCII bytes,
NUL, VT, FF, FS, GS or RS in any header block; a line in a header block that is neither
``Name: value`` nor folding; RFC 2047 encoded-words (``=?``) in a structured header (those in
``Subject`` and other unstructured headers pass the email-package path's own check); ``*`` in a
structured header or an RFC 2231 parameter (``name*=``) anywhere; a ``Content-Type`` or
``Content-Disposition`` with comments, backslashes or parameters without a value; a transfer
encoding that is not one plain token; duplicated ``Content-Type``, ``Content-Transfer-Encoding``
or ``Content-Disposition`` in one part, duplicated ``From`` or ``Message-ID``, more than one
``List-Unsubscribe`` or ``List-Unsubscribe-Post``; a Message-ID that is not a plain
``<left@right>``; ``multipart/signed``, ``multipart/encrypted`` and ``multipart/digest``
anywhere; ``message/*`` other than ``message/rfc822``; a multipart whose boundary is missing,
empty, unusual (outside RFC 2046's characters, trailing space) or a prefix of an enclosing one,
whose first or closing delimiter is not found, with white space after a delimiter, an empty
part, or a part without a blank line after its headers; an unknown, non-text or
non-ASCII-compatible charset (UTF-16, UTF-7, EBCDIC...); an unknown transfer encoding; a
base64 body that is not strictly valid; a body that is not valid in its charset where it must
be re-encoded; no part to carry a footer; more than 16 levels of nesting.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any, Final

from .compliance import _DOMAIN, LIST_UNSUBSCRIBE_POST, RenderedFooters, build_list_unsubscribe
from .errors import InvalidMessageError
from .mime import (
    OUTPUT_POLICY,
    CommaFoldedHeader,
    append_text_footer,
    check_header_safe,
    crlf_only,
    date_value,
    insert_html_footer,
    line_pieces,
    set_charset_utf8,
)

__all__ = ["RawHeaders", "apply_compliance_bytes", "scan_headers"]

_CRLF: Final = b"\r\n"
# What transport.wire_bytes writes with: the policy of every message parse_message returns.
_WIRE = OUTPUT_POLICY.clone(linesep="\r\n")
_MAX_LINE = 998  # RFC 5322 2.1.1, as mime._set_body
_MAX_DEPTH = 16

# A header block as the email package's feed parser reads it: lines "Name:value" (a name of
# printable ASCII but ':') and folding lines. The field as header_source_parse stores it: white
# space after the colon dropped, the value with its folding; written back as "Name: value".
_NAME = rb"[\x21-\x39\x3b-\x7e]+"
_REST = rb"[^\r\n]*(?:\r\n[ \t][^\r\n]*)*\r\n"
# (line, name, white space after the colon): one space is how the email package writes it back.
_LINE = re.compile(rb"((" + _NAME + rb"):([ \t]*)" + _REST + rb")")
# Characters str.splitlines() breaks at (the email package would write them as line breaks).
_UNSAFE_HEADER_BYTES: Final = b"\x00\x0b\x0c\x1c\x1d\x1e"
_RFC2231_PARAM = re.compile(rb"\*[0-9]*\*?[ \t]*=")
# Headers the header registry parses with a structured parser (the others are unstructured);
# check_headers_safe parses any header holding a "*", and those parsers are where surprises live.
_STRUCTURED: Final = frozenset(
    {
        b"date", b"resent-date", b"orig-date", b"sender", b"resent-sender", b"to", b"resent-to",
        b"cc", b"resent-cc", b"bcc", b"resent-bcc", b"from", b"resent-from", b"reply-to",
        b"mime-version", b"content-type", b"content-disposition", b"content-transfer-encoding",
        b"message-id",
    }
)  # fmt: skip
_TOKEN = rb"[!#$%&'*+.^_`{|}~0-9A-Za-z-]+"  # RFC 2045 token
_PARAMS = (
    rb"((?:[ \t]*;[ \t]*" + _TOKEN + rb"[ \t]*=[ \t]*(?:" + _TOKEN + rb'|"[^"\\]*")[ \t]*)*)'
    rb"(?:;[ \t]*)?"
)
_CONTENT_TYPE = re.compile(rb"[ \t]*(" + _TOKEN + rb"/" + _TOKEN + rb")[ \t]*" + _PARAMS)
_DISPOSITION = re.compile(rb"[ \t]*(" + _TOKEN + rb")[ \t]*" + _PARAMS)
_PARAM = re.compile(rb";[ \t]*(" + _TOKEN + rb")[ \t]*=[ \t]*(?:(" + _TOKEN + rb')|"([^"\\]*)")')
_CTE_TOKEN = re.compile(rb"[A-Za-z0-9-]+")
_CHARSET = re.compile(_TOKEN)
# RFC 2046 bchars, at most 70, not ending in a space; no quotes or angle brackets either (the
# email package unquotes a boundary twice, "<...>" included).
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = _ATEXT + rb"(?:\." + _ATEXT + rb")*"
_ADDR_SPEC = _DOT_ATOM + rb"@" + _DOT_ATOM
_MESSAGE_ID = re.compile(rb"<" + _ADDR_SPEC + rb">")
_BARE_ADDRESS = re.compile(rb"[ \t]*(?:<(" + _ADDR_SPEC + rb")>|(" + _ADDR_SPEC + rb"))[ \t]*")
_NAMED_ADDRESS = re.compile(
    rb'[ \t]*(?:' + _ATEXT + rb"(?:[ \t]+" + _ATEXT + rb')*|"[^"\\]*[^"\\ \t][^"\\]*")'
    rb"[ \t]*<" + _ADDR_SPEC + rb">[ \t]*"
)  # fmt: skip
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# Codecs for which decoding (surrogateescape) then encoding gives back the same bytes, and
# which map CR and LF to themselves: footers can be added without decoding the body.
_IDENTITY_CODECS: Final = frozenset({"utf-8", "iso8859-1", "ascii"})
# mime._BODY_END / _HTML_END candidates on bytes (see _html_insert_at): the ASCII characters
# "\s" takes in a str pattern (FS, GS, RS and US too), and any non-ASCII byte.
_STR_SPACE: Final = re.escape(bytes(c for c in range(128) if re.match(r"\s", chr(c))))
_BODY_END_BYTES = re.compile(rb"</body[" + _STR_SPACE + rb"\x80-\xff]*>", re.IGNORECASE)
_HTML_END_BYTES = re.compile(rb"</html[" + _STR_SPACE + rb"\x80-\xff]*>", re.IGNORECASE)
_KNOWN_CTE: Final = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
_SEALED: Final = frozenset({"multipart/signed", "multipart/encrypted", "multipart/digest"})
_CONTENT_FIELDS: Final = frozenset(
    {b"content-type", b"content-transfer-encoding", b"content-disposition"}
)
_LIST_UNSUBSCRIBE: Final = b"list-unsubscribe"
_LIST_UNSUBSCRIBE_POST: Final = b"list-unsubscribe-post"
_LUP_LINE: Final = f"List-Unsubscribe-Post: {LIST_UNSUBSCRIBE_POST}\r\n".encode("ascii")
# Replaced by the compliance step, or dropped by transport.wire_bytes (blind copies).
_LEFT_OUT: Final = frozenset({_LIST_UNSUBSCRIBE, _LIST_UNSUBSCRIBE_POST, b"bcc", b"resent-bcc"})
_ASCII_BYTES: Final = bytes(range(128))
_ASCII_TEXT: Final = _ASCII_BYTES.decode("ascii")

# (lower-cased name, the whole line as written back: "Name: value" CRLF)
_Field = tuple[bytes, bytes]
_Piece = bytes | memoryview
_Content = tuple[str, dict[str, str], str | None, str | None]


class _Fallback(Exception):
    """Raised inside the byte level for any shape it leaves to the email package."""


@dataclass(frozen=True, slots=True)
class RawHeaders:
    """The top-level header block of a message, as :func:`scan_headers` read it.

    Only returned for a plain block (see :func:`scan_headers`), in which a field's unfolded
    value is what the email package's ``str(msg[name])`` gives for an unstructured header (and
    for the plain ``Message-ID`` accepted).

    Attributes:
        fields: ``(name, value)`` in order; ``value`` as the email package stores it: what
            follows ``Name:`` without its leading white space, folding line breaks kept.
        body_offset: where the body starts in the message (after the blank line).
    """

    fields: tuple[tuple[str, str], ...]
    body_offset: int
    # The block as the byte level reads it, so that composing this message does not read
    # it again (apply_compliance_bytes's ``headers``).
    raw_fields: tuple[_Field, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def get_all(self, name: str) -> list[str]:
        """The unfolded values of every field called ``name`` (any case), in order."""
        lname = name.lower()
        return [value.replace("\r\n", "") for n, value in self.fields if n.lower() == lname]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The unfolded value of the first field called ``name`` (any case), else ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def __contains__(self, name: object) -> bool:
        """Whether a field called ``name`` (any case) is present."""
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self.fields)


def scan_headers(data: bytes) -> RawHeaders | None:
    """Read the top-level header block of a CRLF message, or ``None`` if it is not plain.

    Not plain: no ``CRLF CRLF`` separator, an empty block, a bare CR or LF, non-ASCII bytes,
    NUL, VT, FF, FS, GS or RS, a line that is neither ``Name: value`` nor folding (a leading
    ``From`` line too), an encoded-word (``=?``) in a structured header or one the email
    package would refuse, ``*`` in a structured header or an RFC 2231 parameter, an unusual
    ``Content-Type``/``Content-Disposition``/``Content-Transfer-Encoding`` or a duplicated one,
    a duplicated or unusual ``Message-ID``: the header rules of
    :func:`apply_compliance_bytes`, so that a message this accepts usually composes on the
    byte level. Never raises.
    """
    try:
        fields, body = _top_fields(bytes(data))
        _message_id(fields)
        _content(fields)
    except (_Fallback, ValueError, LookupError):
        return None
    pairs = []
    for lname, line in fields:
        pairs.append(
            (line[: len(lname)].decode("ascii"), line[len(lname) + 2 : -2].decode("ascii"))
        )
    return RawHeaders(tuple(pairs), body, tuple(fields))


def apply_compliance_bytes(
    data: bytes,
    footers: RenderedFooters,
    *,
    list_unsubscribe_url: str,
    list_unsubscribe_mailto: str | None,
    message_id_domain: str,
    now: datetime,
    drop_header_prefix: str = "x-prospect-",
    add_message_id: str | None = None,
    from_display_name: str | None = None,
    from_address: str | None = None,
    headers: RawHeaders | None = None,
) -> tuple[bytes, str] | None:
    """Add the footers and compliance headers to a CRLF message; ``(wire bytes, Message-ID)``.

    The bytes are what the general path sends for the same message: parse
    (:func:`~prospect_mailer.mime.parse_message`), drop every header whose lower-cased name
    starts with ``drop_header_prefix``, add ``Message-ID: <add_message_id>`` when given and the
    message has none, :func:`~prospect_mailer.compliance.apply_compliance`, name the sender as
    :func:`prospect_mailer.compose._name_the_sender` does (when ``from_address`` is given: a
    missing From becomes ``from_display_name <from_address>``, a bare address gets
    ``from_display_name``), then :func:`~prospect_mailer.transport.wire_bytes`. The Message-ID
    returned is ``str(final["Message-ID"])`` of that path.

    ``headers`` is what :func:`scan_headers` returned for these very bytes, if it was called:
    the header block is then not read again.

    Returns ``None`` when the message's shape is not handled (see the module docstring) or an
    argument is invalid: the caller then takes the general path, which raises the proper error
    where there is one. Never raises for bad input.
    """
    try:
        unsubscribe = build_list_unsubscribe(list_unsubscribe_url, list_unsubscribe_mailto)
    except InvalidMessageError:
        return None
    if not _DOMAIN.match(message_id_domain) or ".." in message_id_domain:
        return None
    data = bytes(data)
    if not crlf_only(data):
        return None  # the email package would write its other line breaks as CRLF
    try:
        drop = drop_header_prefix.encode("ascii")  # compared with lower-cased names
        if headers is not None and headers.raw_fields:
            fields, body = list(headers.raw_fields), headers.body_offset
        else:
            fields, body = _top_fields(data)
        fields = [f for f in fields if not f[0].startswith(drop)]
        names = [f[0] for f in fields]
        if names.count(_LIST_UNSUBSCRIBE) > 1 or names.count(_LIST_UNSUBSCRIBE_POST) > 1:
            return None  # the general path refuses it with its own message
        message_id = _message_id(fields) if b"message-id" in names else None
        if message_id is None and add_message_id is not None:
            message_id = add_message_id
            fields.append((b"message-id", _message_id_line(add_message_id)))
        job = _Job(data, footers)
        top, pieces = job.body(fields, _content(fields), body, len(data), True, 0, ())
        if not job.footed:
            return None
        kept = [f for f in top if f[0] not in _LEFT_OUT]
        names = [f[0] for f in kept]
        out: list[_Piece] = [f[1] for f in kept]
        if len(unsubscribe) <= _MAX_LINE - 18:  # what CommaFoldedHeader writes on one line
            out.append(f"List-Unsubscribe: {unsubscribe}\r\n".encode("ascii"))
        else:
            lu = CommaFoldedHeader("List-Unsubscribe", unsubscribe).fold(policy=_WIRE)
            out.append(lu.encode("ascii"))
        out.append(_LUP_LINE)
        if message_id is None:
            message_id = make_msgid(domain=message_id_domain)
            out.append(_message_id_line(message_id))
        if b"date" not in names:
            out.append(f"Date: {date_value(now)}\r\n".encode("ascii"))
        if b"mime-version" not in names:
            out.append(b"MIME-Version: 1.0\r\n")
        if from_address is not None:
            senders = names.count(b"from")
            if senders > 1:
                raise _Fallback("several From fields")
            at = names.index(b"from") if senders else -1
            _name_sender(out, at, from_display_name or "", from_address)
        out.append(_CRLF)
        out += pieces
    except (_Fallback, ValueError, LookupError, MessageError):
        # ValueError: UnicodeError and binascii.Error included.
        return None
    return b"".join(out), message_id


def _top_fields(data: bytes) -> tuple[list[_Field], int]:
    sep = data.find(b"\r\n\r\n")
    if sep < 0:
        raise _Fallback("no blank line after the headers")
    return _parse_block(data[: sep + 2]), sep + 4


def _parse_block(block: bytes) -> list[_Field]:
    """The fields of a header block (ending with CRLF), as the email package writes them back.

    Raises:
        _Fallback: the block is not plain.
    """
    if not block.isascii() or len(block.translate(None, _UNSAFE_HEADER_BYTES)) != len(block):
        raise _Fallback("header block is not plain")
    found = _LINE.findall(block)
    if sum([len(line) for line, _, _ in found]) != len(block):
        raise _Fallback("not a header line")  # findall skipped it
    fields = [
        (name.lower(), line if space == b" " else name + b": " + line[len(name) + 1 + len(space) :])
        for line, name, space in found
    ]
    if b"=?" in block:
        # Encoded-words (a French Subject: "=?utf-8?q?Capteurs_connect=C3=A9s?="): written
        # back as they came, so only the safety check of the email-package path is needed,
        # and it is run here on the same value. In a header this module reads or writes, or
        # one the registry parses with a structured parser, they are left to that path.
        for lname, line in fields:
            if b"=?" not in line:
                continue
            if lname in _STRUCTURED or lname.startswith(b"list-unsubscribe"):
                raise _Fallback("encoded-word in a structured header")
            value = line[len(lname) + 2 :].rstrip(b"\r\n").decode("ascii")
            if not _header_safe(line[: len(lname)].decode("ascii"), value):
                raise _Fallback("an encoded-word the email-package path refuses")
    if b"*" in block:
        for lname, line in fields:
            value = line[len(lname) + 2 :]
            if b"*" in value and (lname in _STRUCTURED or _RFC2231_PARAM.search(value)):
                raise _Fallback("'*' in a structured header or an RFC 2231 parameter")
    return fields


@functools.lru_cache(maxsize=256)
def _header_safe(name: str, value: str) -> bool:
    """Whether :func:`~prospect_mailer.mime.check_header_safe` accepts the header, memoised:
    a campaign's messages share their Subject."""
    try:
        check_header_safe(name, value)
    except InvalidMessageError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _part_head(block: bytes) -> tuple[tuple[_Field, ...], _Content]:
    """:func:`_parse_block` and :func:`_content` of a part's header block, memoised.

    A part's headers are typically the same in every message a client writes (``text/plain;
    charset=UTF-8``...). Callers never change what this returns.
    """
    fields = tuple(_parse_block(block))
    return fields, _content(fields)


def _value(field: _Field) -> bytes:
    return field[1][len(field[0]) + 2 : -2]


def _message_id(fields: Sequence[_Field]) -> str | None:
    """The message's Message-ID (as ``str(msg["Message-ID"])`` gives it) or ``None``."""
    found = [f for f in fields if f[0] == b"message-id"]
    if not found:
        return None
    value = _value(found[0])
    if len(found) > 1 or not _MESSAGE_ID.fullmatch(value):
        raise _Fallback("Message-ID not plain")
    return value.decode("ascii")


def _message_id_line(value: str) -> bytes:
    """``Message-ID: value`` as the header object the general path stores is written."""
    raw = value.encode("ascii")  # UnicodeEncodeError: fall back
    if not _MESSAGE_ID.fullmatch(raw):
        raise _Fallback("Message-ID not plain")
    return b"Message-ID: " + raw + _CRLF


def _content(fields: Sequence[_Field]) -> _Content:
    """``(content type, parameters, transfer encoding, disposition)`` of one entity.

    What ``get_content_type``, ``get_param``, ``get_content_disposition`` and the transfer
    encoding reads of the email package give, for the plain forms accepted here. The
    parameters are shared: never changed.
    """
    ctype = "text/plain"
    params: dict[str, str] = _NO_PARAMS
    cte = disposition = None
    seen: set[bytes] = set()
    for lname, line in fields:
        if lname not in _CONTENT_FIELDS:
            continue
        if lname in seen:
            raise _Fallback("duplicated Content-* field")
        seen.add(lname)
        value = line[len(lname) + 2 : -2]
        if lname == b"content-type":
            ctype, params = _content_type(value)
        elif lname == b"content-disposition":
            disposition = _disposition(value)
        elif _CTE_TOKEN.fullmatch(value):
            cte = value.decode("ascii").lower()
        else:
            raise _Fallback("transfer encoding not one token")
    return ctype, params, cte, disposition


_NO_PARAMS: Final[dict[str, str]] = {}


@functools.lru_cache(maxsize=256)
def _content_type(value: bytes) -> tuple[str, dict[str, str]]:
    """Content type (lower case) and parameters (names in lower case, values unquoted)."""
    m = _CONTENT_TYPE.fullmatch(value.replace(_CRLF, b""))
    if m is None:
        raise _Fallback("Content-Type not plain")
    params: dict[str, str] = {}
    for p in _PARAM.finditer(m[2]):
        key = p[1].decode("ascii").lower()
        if key in params:
            raise _Fallback("duplicated parameter")
        params[key] = (p[2] if p[2] is not None else p[3]).decode("ascii")
    return m[1].decode("ascii").lower(), params


@functools.lru_cache(maxsize=256)
def _disposition(value: bytes) -> str:
    m = _DISPOSITION.fullmatch(value.replace(_CRLF, b""))
    if m is None:
        raise _Fallback("Content-Disposition not plain")
    return m[1].decode("ascii").lower()


@functools.lru_cache(maxsize=64)
def _codec(charset: str) -> str | None:
    """The codec name of ``charset`` if it is a text encoding that keeps ASCII as is."""
    try:
        name = codecs.lookup(charset).name
        same = _ASCII_BYTES.decode(name) == _ASCII_TEXT and _ASCII_TEXT.encode(name) == _ASCII_BYTES
    except (LookupError, ValueError):  # unknown, or not a text encoding (base64, rot13...)
        return None
    return name if same else None


@functools.lru_cache(maxsize=256)
def _address_line(name: str, display: str, addr_spec: str) -> bytes | None:
    """``name: display <addr_spec>`` as the email package writes that header object."""
    try:
        value = Address(display_name=display, addr_spec=addr_spec)
        header = _WIRE.header_store_parse(name, value)[1]
        return _WIRE.fold_binary(name, header)
    except (ValueError, LookupError, MessageError):
        return None


def _name_sender(lines: list[_Piece], at: int, display: str, address: str) -> None:
    """``compose._name_the_sender`` on the header lines (in place); ``at``: the From line."""
    if at < 0:
        line = _address_line("From", display, address)
        if line is None:
            raise _Fallback("From cannot be written")
        lines.append(line)
        return
    old = bytes(lines[at])
    value = old[6:-2]
    if not display or _NAMED_ADDRESS.fullmatch(value):
        return  # names someone (or no name to give): kept
    m = _BARE_ADDRESS.fullmatch(value)
    spec = (m[1] or m[2]).decode("ascii") if m else _registry_bare_address(value.decode("ascii"))
    if spec:
        line = _address_line(old[:4].decode("ascii"), display, spec)
        if line is None:
            raise _Fallback("From cannot be written")
        lines[at] = line


def _registry_bare_address(value: str) -> str:
    """The addr-spec if the email package reads ``value`` as one address without a name."""
    try:
        header: Any = OUTPUT_POLICY.header_fetch_parse("From", value)
        addresses = header.addresses
    except (AttributeError, ValueError, IndexError):
        return ""  # unparseable: the general path keeps it too
    if len(addresses) == 1 and not addresses[0].display_name:
        return str(addresses[0].addr_spec)
    return ""


def _crlf_lines(data: bytes) -> bytes:
    """Every CR, LF and CRLF as CRLF (what the generator's ``_write_lines`` does)."""
    return data.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)


def _encode_body(data: bytes, cte: str, wire_form: bool) -> tuple[str, bytes]:
    """``mime._set_body``: the final transfer encoding and the payload as written (CRLF).

    ``wire_form``: ``data`` is known to break lines with CRLF only.
    """
    if cte in ("7bit", "8bit"):
        # bytes.splitlines() breaks at CR, LF and CRLF; a split at LF only is faster and no
        # line is longer than its longest piece.
        too_long = (
            len(data) > _MAX_LINE
            and max(map(len, data.split(b"\n"))) > _MAX_LINE
            and max(map(len, data.splitlines())) > _MAX_LINE
        )
        if too_long or (cte == "7bit" and not data.isascii()):
            cte = "quoted-printable"
    if cte == "base64":
        # base64mime.body_encode: 57-byte chunks, i.e. 76-character lines of one encoding.
        enc = binascii.b2a_base64(data, newline=False)
        lines = [enc[i : i + 76] for i in range(0, len(enc), 76)]
        return cte, _CRLF.join(lines) + _CRLF if lines else b""
    if cte == "quoted-printable":
        return cte, _quoted_printable(data)
    return cte, data if wire_form else _crlf_lines(data)


_QP_PIECE = 256 * 1024


def _quoted_printable(data: bytes) -> bytes:
    """``quoprimime.body_encode(data, maxlinelen=76, eol="\\n")`` with CRLF line ends.

    Encoded in pieces of whole lines (the encoding works line by line, so the text is the
    same): for a big message, in a worker thread, the GIL is given up between pieces instead of
    being held for one long C call over the whole body.
    """
    out: list[bytes] = []
    for start, end in line_pieces(data, _QP_PIECE):
        text = quoprimime.body_encode(data[start:end].decode("latin-1"), maxlinelen=76, eol="\n")
        out.append(text.replace("\n", "\r\n").encode("ascii"))
    return b"".join(out)


def _set_transfer_encoding(fields: Sequence[_Field], cte: str) -> Sequence[_Field]:
    """The ``Content-Transfer-Encoding`` change of ``mime._set_body``, on header lines."""
    for i, field in enumerate(fields):
        if field[0] == b"content-transfer-encoding":
            if _value(field).decode("ascii").lower() != cte:
                line = field[1][:25] + b": " + cte.encode("ascii") + _CRLF
                return [*fields[:i], (field[0], line), *fields[i + 1 :]]
            return fields
    if cte != "7bit":
        line = f"Content-Transfer-Encoding: {cte}\r\n".encode("ascii")
        return [*fields, (b"content-transfer-encoding", line)]
    return fields


def _set_utf8(fields: Sequence[_Field], cte: str) -> list[_Field]:
    """``set_param("charset", "utf-8")`` and the transfer encoding change, by the email package.

    ``set_param`` moves ``Content-Type`` to the end and re-quotes its parameters: rare
    (a ``text/plain`` part whose charset cannot hold the footer), so done by the real thing.
    """
    holder = EmailMessage(policy=OUTPUT_POLICY)
    for _, line in fields:
        name, _, value = line[:-2].partition(b": ")
        holder.set_raw(name.decode("ascii"), value.decode("ascii"))
    try:
        set_charset_utf8(holder)
    except InvalidMessageError:
        raise _Fallback("a parameter the email package cannot fold") from None
    if "Content-Transfer-Encoding" in holder:
        if str(holder["Content-Transfer-Encoding"]).strip().lower() != cte:
            holder.replace_header("Content-Transfer-Encoding", cte)
    elif cte != "7bit":
        holder["Content-Transfer-Encoding"] = cte
    return [
        (name.lower().encode("ascii"), _WIRE.fold_binary(name, value))
        for name, value in holder.raw_items()
    ]


class _Job:
    """One message: the input bytes, the footers, and how many parts got one."""

    __slots__ = ("_bytes", "_html", "_text", "data", "footed", "footers", "view")

    def __init__(self, data: bytes, footers: RenderedFooters) -> None:
        self.data = data
        self.view = memoryview(data)
        self.footers = footers
        self.footed = 0
        self._text: dict[str, tuple[str, bool]] = {}
        self._html: dict[tuple[str, str], tuple[str, bool]] = {}
        self._bytes: dict[tuple[bool, str, bytes], tuple[bytes, bool]] = {}

    def entity(
        self, start: int, end: int, foot: bool, depth: int, bounds: tuple[bytes, ...]
    ) -> tuple[Sequence[_Field], list[_Piece]]:
        """Header lines and body pieces of the entity in ``data[start:end]``."""
        data = self.data
        if start == end or data.startswith(_CRLF, start, end):
            # No headers: the blank line (here, or the CRLF before the delimiter) and a body.
            fields: Sequence[_Field] = ()
            content: _Content = ("text/plain", _NO_PARAMS, None, None)
            body = min(start + 2, end)
        else:
            sep = data.find(b"\r\n\r\n", start, end)
            if sep >= 0:
                fields, content = _part_head(data[start : sep + 2])
                body = sep + 4
            else:
                # Headers, then the delimiter (the CRLF before it ends the last header line, or
                # the blank line): the feed parser reads them and an empty body; the generator
                # writes the blank line.
                block = data[start:end]
                fields, content = _part_head(block if block.endswith(_CRLF) else block + _CRLF)
                body = end
        return self.body(fields, content, body, end, foot, depth, bounds)

    def body(
        self,
        fields: Sequence[_Field],
        content: tuple[str, dict[str, str], str | None, str | None],
        start: int,
        end: int,
        foot: bool,
        depth: int,
        bounds: tuple[bytes, ...],
    ) -> tuple[Sequence[_Field], list[_Piece]]:
        """Header lines and body pieces for a body in ``data[start:end]`` (see :meth:`entity`).

        ``end`` excludes the CRLF that belongs to the next delimiter, as the feed parser cuts
        a part's payload. ``foot``: footable parts get footers (false inside message/rfc822).
        """
        ctype, params, cte, disposition = content
        if depth > _MAX_DEPTH:
            raise _Fallback("nested too deep")
        main = ctype.partition("/")[0]
        if main == "multipart":
            if ctype in _SEALED:
                raise _Fallback(ctype)
            boundary = params.get("boundary", "")
            if not _BOUNDARY.fullmatch(boundary):
                raise _Fallback("boundary missing or unusual")
            delim = b"--" + boundary.encode("ascii")
            if any(b.startswith(delim) or delim.startswith(b) for b in bounds):
                raise _Fallback("boundary is a prefix of an enclosing one")
            return fields, self.multipart(delim, start, end, foot, depth + 1, (*bounds, delim))
        if main == "message":
            if ctype != "message/rfc822" or cte not in (None, "7bit", "8bit", "binary"):
                raise _Fallback(ctype)
            inner, pieces = self.entity(start, end, False, depth + 1, bounds)
            return fields, [*(line for _, line in inner), _CRLF, *pieces]
        if foot and ctype in ("text/plain", "text/html") and disposition != "attachment":
            return self.foot(fields, ctype == "text/html", params, cte, start, end)
        return fields, [self.view[start:end]]

    def multipart(
        self, delim: bytes, start: int, end: int, foot: bool, depth: int, bounds: tuple[bytes, ...]
    ) -> list[_Piece]:
        """The body of a multipart as the generator writes it back.

        The feed parser's reading: a preamble up to the first delimiter line, parts up to the
        CRLF before the next one, an epilogue after the closing one. The generator writes
        ``preamble CRLF`` (if any), ``--b CRLF part``, ``CRLF --b CRLF part``...,
        ``CRLF --b-- CRLF`` and the epilogue.
        """
        data = self.data
        out: list[_Piece] = []
        kind = self.delimiter_at(delim, start, end) if data.startswith(delim, start, end) else None
        if kind is not None:
            if kind != "open":
                raise _Fallback("multipart starts with a closing or unusual delimiter")
            line = start
        else:
            at, kind = self.next_delimiter(delim, start, end)
            if kind != "open":
                raise _Fallback("closing delimiter before the first part")
            out += [self.view[start:at], _CRLF]  # the preamble
            line = at + 2
        opening = delim + _CRLF
        between = _CRLF + opening
        first = True
        while True:
            part = line + len(opening)
            at, kind = self.next_delimiter(delim, part - 2, end)
            if at == part - 2:
                raise _Fallback("empty part")
            fields, pieces = self.entity(part, at, foot, depth, bounds)
            out.append(opening if first else between)
            first = False
            out += [f[1] for f in fields]
            out.append(_CRLF)
            out += pieces
            if kind == "close":
                out.append(_CRLF + delim + b"--" + _CRLF)
                after = at + 2 + len(delim) + 2
                if after < end:
                    out.append(self.view[after + 2 : end])  # the epilogue
                return out
            line = at + 2

    def delimiter_at(self, delim: bytes, at: int, end: int) -> str | None:
        """What the line at ``at`` (starting with ``delim``) is: open, close, or ``None``."""
        data = self.data
        j = at + len(delim)
        if j == end:
            raise _Fallback("delimiter at the end of its part")
        if data.startswith(_CRLF, j, end):
            return "open"
        if data.startswith(b"--", j, end):
            k = j + 2
            if k == end or data.startswith(_CRLF, k, end):
                return "close"
            if data[k] in b" \t":
                raise _Fallback("white space after a delimiter")
            return None
        if data[j] in b" \t":
            raise _Fallback("white space after a delimiter")
        return None

    def next_delimiter(self, delim: bytes, start: int, end: int) -> tuple[int, str]:
        """Index of the CRLF before the next delimiter line after ``start``, and its kind."""
        needle = _CRLF + delim
        pos = start
        while True:
            at = self.data.find(needle, pos, end)
            if at < 0:
                raise _Fallback("delimiter not found")
            kind = self.delimiter_at(delim, at + 2, end)
            if kind is not None:
                return at, kind
            pos = at + 2

    def foot(
        self,
        fields: Sequence[_Field],
        html: bool,
        params: dict[str, str],
        given_cte: str | None,
        start: int,
        end: int,
    ) -> tuple[Sequence[_Field], list[_Piece]]:
        """``mime.add_footer`` on one text part."""
        cte = given_cte or "7bit"
        if cte not in _KNOWN_CTE:
            raise _Fallback("unknown transfer encoding")
        charset = params.get("charset", "us-ascii")
        if not _CHARSET.fullmatch(charset.encode("ascii")):
            raise _Fallback("unusual charset")
        codec = _codec(charset.lower())
        if codec is None:
            raise _Fallback("unknown or unusual charset")
        payload = self.data[start:end]
        if cte == "quoted-printable":
            raw = binascii.a2b_qp(payload)
        elif cte == "base64":
            # Strict only: the email package accepts broken base64 with defects, we do not.
            joined = payload.replace(_CRLF, b"")
            if len(joined) % 4:
                raise _Fallback("base64 needs padding")
            raw = base64.b64decode(joined, validate=True)
        else:
            raw = payload
        done = self.foot_bytes(raw, html, codec) if codec in _IDENTITY_CODECS else None
        utf8 = False
        if done is None and codec == "ascii" and not html and raw.isascii():
            # A US-ASCII text whose footer needs more (a French one): what the text level
            # below does (UTF-8, quoted-printable unless base64) without decoding and encoding
            # the whole body again; for a big one, five calls over it that each held the GIL.
            done = self.foot_bytes(raw, False, "utf-8")
            if done is not None:
                utf8 = True
                if cte != "base64":
                    cte = "quoted-printable"
        if done is not None:
            data, wire_form = done
        else:
            body = raw.decode(codec, "surrogateescape")
            # isascii() is a flag lookup: only a non-ASCII body can hold escaped bytes. Searched
            # before the footer is appended (a 20 MB body would hold the GIL in one regex
            # call), the footer on its own after: the same answer as add_footer's search of
            # the two joined (append_text_footer only adds line breaks between them).
            escaped = not body.isascii() and _ESCAPED_BYTE.search(body) is not None
            newline = "\r\n" if "\r\n" in body else "\n"
            if html:
                footer, plain = self.html_footer(codec, newline)
                body = insert_html_footer(body, footer)
            else:
                footer, plain = self.text_footer(newline)
                body = append_text_footer(body, footer, newline)
                try:
                    footer.encode(codec)
                except UnicodeEncodeError:
                    if escaped or _ESCAPED_BYTE.search(footer):
                        raise _Fallback("body not valid in its charset") from None
                    codec, utf8 = "utf-8", True
                    if cte != "base64":
                        cte = "quoted-printable"
            data = body.encode(codec, "surrogateescape")
            wire_form = newline == "\r\n" and plain
        cte, encoded = _encode_body(data, cte, wire_form)
        if utf8:
            fields = _set_utf8(fields, cte)
        elif cte != (given_cte or "7bit"):
            fields = _set_transfer_encoding(fields, cte)
        self.footed += 1
        return fields, [encoded]

    def foot_bytes(self, raw: bytes, html: bool, codec: str) -> tuple[bytes, bool] | None:
        """:meth:`foot` without decoding, for a codec whose round trip is the identity.

        Returns the body with its footer and whether it breaks lines with CRLF only (as the
        wire payload does), or ``None`` where the text level is needed (an HTML end tag with
        non-ASCII white space, a text footer the charset cannot hold).
        """
        newline = b"\r\n" if b"\r\n" in raw else b"\n"
        if html:
            at = _html_insert_at(raw)
            if at is None:
                return None
            footer, plain = self.footer_bytes(True, codec, newline)
            view = memoryview(raw)  # one copy of a big body, not four
            return b"".join((view[:at], footer, view[at:])), plain and newline == _CRLF
        try:
            footer, plain = self.footer_bytes(False, codec, newline)
        except UnicodeEncodeError:
            return None  # re-encoded as UTF-8 at the text level
        plain = plain and newline == _CRLF
        if not raw:
            return footer, plain
        tail = newline + footer if raw.endswith((b"\n", b"\r")) else newline + newline + footer
        return raw + tail, plain  # one copy of a big body, not three

    def footer_bytes(self, html: bool, codec: str, newline: bytes) -> tuple[bytes, bool]:
        """A footer encoded as ``add_footer`` writes it into a body in ``codec`` (an identity
        codec), and whether it has no line break but ``newline``.

        Raises:
            UnicodeEncodeError: a text footer ``codec`` cannot hold.
        """
        key = (html, codec, newline)
        got = self._bytes.get(key)
        if got is None:
            if html:  # what the text level's xmlcharrefreplace round trip then encode give
                footer = self.footers.html.encode(codec, "xmlcharrefreplace")
            else:
                footer = self.footers.text.encode(codec)
            # CR and LF are single bytes in these codecs and in no other character.
            if b"\r" in footer:
                footer = footer.replace(_CRLF, b"\n")
            plain = b"\r" not in footer
            got = self._bytes[key] = (footer.replace(b"\n", newline), plain)
        return got

    def text_footer(self, newline: str) -> tuple[str, bool]:
        """The text footer with ``newline`` line breaks, and whether it has no other."""
        got = self._text.get(newline)
        if got is None:
            got = self._text[newline] = _with_newline(self.footers.text, newline)
        return got

    def html_footer(self, codec: str, newline: str) -> tuple[str, bool]:
        """The HTML footer for ``codec`` (see :meth:`text_footer`), as ``add_footer`` makes it.

        Characters ``codec`` cannot hold become numeric character references.
        """
        got = self._html.get((codec, newline))
        if got is None:
            footer, plain = _with_newline(self.footers.html, newline)
            if codec != "utf-8" or not _utf8_ok(footer):
                # utf-8 holds everything but lone surrogates: the round trip is the identity.
                footer = footer.encode(codec, "xmlcharrefreplace").decode(codec)
            got = self._html[codec, newline] = (footer, plain)
        return got


def _html_insert_at(raw: bytes) -> int | None:
    """Where ``mime.insert_html_footer`` inserts, found on the bytes of an ASCII-compatible body.

    The text-level patterns (``</body\\s*>``, ignoring case) also take non-ASCII white space;
    candidates here take any non-ASCII byte, so the last candidate is the last real match when
    it is all ASCII; otherwise ``None`` (the text level decides).
    """
    for pattern in (_BODY_END_BYTES, _HTML_END_BYTES):
        last = None
        for last in pattern.finditer(raw):  # noqa: B007 (the last one is wanted)
            pass
        if last is not None:
            return last.start() if last[0].isascii() else None
    return len(raw)


def _utf8_ok(text: str) -> bool:
    """Whether ``text`` has no lone surrogate (a regular expression is slower)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _with_newline(footer: str, newline: str) -> tuple[str, bool]:
    """``footer`` with its line breaks as ``newline`` (as ``add_footer``), and whether it has
    no other line break (a CR of its own)."""
    if "\r" in footer:
        footer = footer.replace("\r\n", "\n")
        plain = "\r" not in footer
    else:
        plain = True
    return (footer.replace("\n", newline) if newline != "\n" else footer), plain
