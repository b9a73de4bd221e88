"""MIME plumbing for :mod:`prospect_mailer.compliance` (pure, no I/O).

Python's :mod:`email` package is convenient but has sharp edges for a tool that must rewrite
other people's messages without breaking them. This module keeps the work-arounds in one place:

* :data:`OUTPUT_POLICY` never refolds a header it parsed (``refold_source="none"``), so parts we
  do not touch come out byte-identical, and an RFC 2047 encoded-word hiding a CR/LF is never
  re-serialised in decoded form (CVE-2024-6923 on Python < 3.11.10 / 3.12.5).
* :func:`check_headers_safe` refuses such headers explicitly, whatever the Python version; it
  also refuses the other characters ``str.splitlines()`` breaks at (VT, FF, FS, GS, RS...),
  which ``EmailPolicy`` writes back as real line breaks.
* :class:`CommaFoldedHeader` is a header value every :class:`~email.policy.EmailPolicy` emits as
  built: ``policy.default`` would turn a long ``List-Unsubscribe`` into encoded-words, which no
  mail client can use.
* :func:`add_footer` appends to a text part keeping its charset and transfer encoding.

Speed. ``policy.default`` builds a structured header object (``headerregistry`` on top of
``_header_value_parser``, 10-65 µs each) on *every* read of a header, and the parser, the
generator and the legacy accessors (``get_content_type``, ``get_param``, ``get_payload``) read
``Content-Type`` over and over: 15 parses to read a 3-part message, 7 more to write it. That,
plus structuring every header in :func:`check_headers_safe`, was ~90% of the cost of the
compliance step. We keep ``policy.default`` semantics, and make them cheap:

* :data:`OUTPUT_POLICY` is a ``policy.default`` whose ``header_fetch_parse`` memoises the
  (immutable) header objects of the stock header registry, keyed on (name, unfolded value), in
  a small LRU: a value is parsed once, not once per read, and the ``Content-Type`` of ordinary
  text parts is shared between messages. What a reader gets is what ``policy.default``
  would build (a header of the same kind: same ``str``, ``params``, ``addresses``...), so callers
  (``msg["Message-ID"]``, ``get_body``, ``iter_attachments``, ``get_content``) are unaffected;
  we did not switch to ``compat32`` (its accessors return plain strings, which breaks
  ``EmailMessage.get_body``/``is_attachment``, and it refolds every header it writes).
* :func:`check_headers_safe` builds a structured header only where decoding can happen (the
  value holds an encoded-word ``=?`` or an RFC 2231 ``*``) or where the pipeline reads the
  header through the registry anyway (``Content-*``, ``Message-ID``); any other value is
  decoded to itself, so checking its raw form is the same check.
* :func:`parse_message` no longer deep-copies a message object: it serialises a shallow copy of
  the top level (the generator only changes a message to set a missing boundary, in which case
  it still copies the whole tree).

What is left is mostly the stdlib feed parser itself: a Python loop over every line, and one
``re.compile`` (~80 µs) per multipart boundary not seen before.
"""

from __future__ import annotations

import binascii
import codecs
import copy
import functools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import base64mime, quoprimime
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import EmailPolicy, Policy
from email.policy import compat32 as _compat32
from email.policy import default as _default_policy
from email.utils import collapse_rfc2231_value, format_datetime
from typing import TYPE_CHECKING, Any, cast

from .errors import InvalidMessageError

__all__ = [
    "GIL_PIECE",
    "OUTPUT_POLICY",
    "CommaFoldedHeader",
    "add_footer",
    "append_text_footer",
    "check_header_safe",
    "check_headers_safe",
    "crlf_only",
    "date_value",
    "footable_parts",
    "insert_html_footer",
    "line_pieces",
    "parse_message",
    "set_charset_utf8",
]

# The header registry of policy.default (and of every policy cloned from it, policy.SMTP too).
_STOCK_HEADERS = cast(HeaderRegistry, _default_policy.header_factory)
# Header objects kept by the memo; values longer than _MEMO_MAX_VALUE are parsed every time.
_MEMO_SIZE = 256
_MEMO_MAX_VALUE = 998
_LINESEP = re.compile(r"\n|\r")  # what EmailPolicy.header_fetch_parse removes


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _stock_header(name: str, value: str) -> Any:
    # Header objects are immutable (read-only properties, tuples, MappingProxyType params), so
    # one can be handed to any number of readers. HeaderRegistry.__call__ is
    # ``self[name](name, value)``; only the class lookup is cached.
    return _stock_class(name.lower())(name, value)


@functools.lru_cache(maxsize=128)
def _stock_class(lname: str) -> Any:
    # HeaderRegistry.__getitem__ builds a new class (type(...)) on every call: about a third
    # of the cost of a small header. The classes it builds for one name are all alike.
    return _STOCK_HEADERS[lname]


def _structured(name: str, unfolded: str, factory: Any = _STOCK_HEADERS) -> Any:
    """``factory(name, unfolded)``, memoised for the stock registry and short values."""
    if factory is _STOCK_HEADERS and len(unfolded) <= _MEMO_MAX_VALUE:
        return _stock_header(name, unfolded)
    return factory(name, unfolded)


if TYPE_CHECKING:
    _EmailPolicyBase = EmailPolicy[EmailMessage]
else:
    _EmailPolicyBase = EmailPolicy  # not subscriptable at run time


class _MemoPolicy(_EmailPolicyBase):
    """An :class:`EmailPolicy` whose header reads are memoised (see the module docstring)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        """What :meth:`EmailPolicy.header_fetch_parse` returns, built once per distinct value."""
        if hasattr(value, "name"):
            return value
        if "\n" in value or "\r" in value:
            value = "".join(_LINESEP.split(value))
        return _structured(name, value, self.header_factory)  # type: ignore[no-any-return]


#: Policy of every message we return: ``policy.default`` except that parsed headers are written
#: back exactly as they came (no refolding) and header reads are memoised.
OUTPUT_POLICY: EmailPolicy[EmailMessage] = _MemoPolicy(
    refold_source="none", header_factory=_STOCK_HEADERS
)

# RFC 5322 section 2.1.1: a line MUST NOT exceed 998 octets (78 is only a SHOULD).
_MAX_LINE = 998
_BAD_CHARS = ("\r", "\n", "\x00")
# An RFC 2047 encoded-word, wherever it appears (the parser only decodes some positions, a
# mail client may decode others). The strict form, and the lax one of email.header (which
# allows white space inside the word, as the structured parser does).
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?\s]*)\?=")
_LAX_ENCODED_WORD = re.compile(  # email.header.ecre
    r"=\?(?P<charset>[^?]*?)\?(?P<encoding>[qQbB])\?(?P<encoded>.*?)\?=", re.MULTILINE
)
# A line break inside a raw header value is only legal as folding (followed by WSP); NUL never.
# Nor any other character str.splitlines() breaks at (VT, FF, FS, GS, RS, NEL, U+2028/9):
# EmailPolicy writes a source value back as linesep.join(value.splitlines()), which would turn
# it into a real line break, i.e. a new header line.
_RAW_UNSAFE = re.compile(
    r"[\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]|\r\n(?![ \t])|\r(?![\n])|(?<!\r)\n(?![ \t])"
)
# Headers the pipeline reads through the header registry (footable walk, generator, relay):
# always parsed here, so that a value the registry fails on is refused up front.
_REGISTRY_READ = frozenset(
    {"content-type", "content-disposition", "content-transfer-encoding", "message-id"}
)
# Signing and encryption cover the bytes of the protected part: a footer would break them.
_SEALED = frozenset({"multipart/signed", "multipart/encrypted"})
_KNOWN_CTE = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
# Longest Content-Type parameter name set_charset_utf8 lets the email package fold (real ones:
# charset, format, delsp, name, boundary, reply-type...; the loop starts at about 60).
_MAX_PARAM_NAME = 40
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_HTML_END = re.compile(r"</html\s*>", re.IGNORECASE)


class CommaFoldedHeader(str):
    """A header value that every email policy writes exactly as built.

    The :mod:`email` policies call ``fold(policy=...)`` on any stored value that has a ``name``
    attribute (the header-object protocol), so this value is folded by our rule even when a
    transport flattens the message with ``policy.SMTP``: lines are broken only after a comma
    (``", "``), only when the field would not fit in one 998-octet line, and never inside a
    URI. One unfolded line is what naive List-Unsubscribe parsers handle best; RFC 5322 only
    *recommends* 78 characters.

    Raises:
        InvalidMessageError: the value holds CR/LF/NUL or non-ASCII, or one comma-separated item
            cannot fit in a 998-octet line.
    """

    name: str
    defects: tuple[()] = ()

    def __new__(cls, name: str, value: str) -> CommaFoldedHeader:
        """Build the value ``value`` for header ``name``."""
        if any(c in value for c in _BAD_CHARS) or not value.isascii():
            raise InvalidMessageError(f"{name} value must be one line of ASCII: {value!r}")
        self = super().__new__(cls, value)
        self.name = name
        if any(len(line) > _MAX_LINE for line in self._lines()):
            raise InvalidMessageError(f"{name} value has an item longer than {_MAX_LINE} octets")
        return self

    def __reduce__(self) -> tuple[type[CommaFoldedHeader], tuple[str, str]]:
        # copy/deepcopy/pickle: rebuild through __new__ (str's default would drop `name`).
        return (CommaFoldedHeader, (self.name, str(self)))

    def _lines(self) -> list[str]:
        items = str(self).split(", ")
        lines = [f"{self.name}: {items[0]}"]
        for item in items[1:]:
            if len(lines[-1]) + 2 + len(item) <= _MAX_LINE:
                lines[-1] += ", " + item
            else:
                lines[-1] += ","
                lines.append(" " + item)
        return lines

    def fold(self, *, policy: Policy) -> str:
        """Return the header line(s) ending with ``policy.linesep`` (header-object protocol)."""
        return policy.linesep.join(self._lines()) + policy.linesep


def check_headers_safe(msg: Message) -> None:
    """Refuse a message whose headers could turn into extra header lines when re-serialised.

    Every header of every part (attached messages included) is checked three ways: the raw
    value may only break lines as folding and may not hold NUL (nor any other character that
    ``str.splitlines()`` breaks at); its value as the email package decodes it (RFC 2047
    encoded-words, RFC 2231 parameters) may not hold CR, LF or NUL; and each encoded-word found
    anywhere in it, and each RFC 2231 parameter, may not decode to CR, LF or NUL.

    The email package's decoded value is only computed where it can differ from the raw value
    (an ``=?`` or a ``*`` in it) or where the pipeline reads the header as an object anyway
    (``Content-Type``, ``Content-Disposition``, ``Content-Transfer-Encoding``, ``Message-ID``);
    elsewhere it is the raw value with folding removed, already checked.

    Raises:
        InvalidMessageError: naming the first offending header.
    """
    for part in msg.walk():
        for name, stored in part.raw_items():
            check_header_safe(name, stored if isinstance(stored, str) else str(stored))


def check_header_safe(name: str, raw: str) -> None:
    """:func:`check_headers_safe` for one header, ``raw`` being its value as parsed from source
    (folding kept, the line end of its last line removed).

    Raises:
        InvalidMessageError: naming the header.
    """
    if _RAW_UNSAFE.search(raw):
        raise InvalidMessageError(f"header {name!r} contains a raw line break or NUL")
    encoded_word = "=?" in raw
    rfc2231 = "*" in raw
    if not (encoded_word or rfc2231 or name.lower() in _REGISTRY_READ):
        return
    try:
        decoded = str(_structured(name, "".join(raw.splitlines())))
    except Exception as exc:
        # The stdlib parser raises assorted types on hostile input (3.11.7 raises
        # ValueError for an address whose decoded display name holds CR/LF): refuse.
        raise InvalidMessageError(f"header {name!r} cannot be decoded safely: {exc}") from exc
    if (
        any(c in decoded for c in _BAD_CHARS)
        or (encoded_word and _encoded_word_unsafe(raw))
        or (rfc2231 and _rfc2231_unsafe(name, raw))
    ):
        raise InvalidMessageError(
            f"header {name!r} decodes to a CR, LF or NUL (header injection, "
            "CVE-2024-6923); refusing the message"
        )


def _encoded_word_unsafe(raw: str) -> bool:
    unfolded = "".join(raw.splitlines())
    words = _ENCODED_WORD.findall(raw) + [
        (m["charset"], m["encoding"], m["encoded"]) for m in _LAX_ENCODED_WORD.finditer(unfolded)
    ]
    for charset, enc, text in words:
        try:
            data = (
                _lenient_b64(text)
                if enc in "bB"
                else quoprimime.header_decode(text).encode("latin-1", "replace")
            )
            decoded = data.decode(charset.split("*", 1)[0], "replace")
        except (LookupError, ValueError):
            decoded = ""  # an undecodable charset cannot yield a line break for a client either
        if any(c in decoded for c in _BAD_CHARS):
            return True
    return False


def _lenient_b64(text: str) -> bytes:
    """Decode base64 the way lenient readers do: ignore junk, fix padding, drop a stray char."""
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    return binascii.a2b_base64(clean + "=" * (-len(clean) % 4))


def _rfc2231_unsafe(name: str, raw: str) -> bool:
    """Whether a parameter of ``raw`` decodes (RFC 2231, legacy accessor) to CR, LF or NUL."""
    holder = Message(policy=_compat32)
    holder[name] = "".join(raw.splitlines())
    try:
        params = holder.get_params(header=name) or []
        values = [collapse_rfc2231_value(value) for _, value in params]
    except Exception:  # what the legacy accessor cannot read, it does not decode either
        return False
    return any(c in value for value in values for c in _BAD_CHARS)


def parse_message(message: Message | bytes) -> EmailMessage:
    """Return a private :class:`EmailMessage` copy of ``message`` using :data:`OUTPUT_POLICY`.

    A message object is checked (:func:`check_headers_safe`) *before* it is serialised, then
    serialised without refolding and parsed again, so the caller's object is never changed and
    every part is backed by bytes we can reproduce. The generator writes a shallow copy of the
    top level (it swaps that object's policy while it works); only when a multipart part has
    no boundary yet (the generator sets one) is the whole tree deep-copied first.

    Raises:
        InvalidMessageError: unsafe headers, or an object that is not a message.
    """
    if isinstance(message, bytes | bytearray):
        data = bytes(message)
    elif isinstance(message, Message):
        check_headers_safe(message)
        pol = message.policy
        if isinstance(pol, EmailPolicy):
            pol = _memoised(pol).clone(refold_source="none")
        if all(p.get_boundary() is not None for p in message.walk() if p.is_multipart()):
            top = copy.copy(message)
        else:
            top = copy.deepcopy(message)
        data = top.as_bytes(policy=pol)
    else:
        raise InvalidMessageError(f"expected an EmailMessage or bytes, not {type(message)!r}")
    parsed = BytesParser(policy=OUTPUT_POLICY).parsebytes(data)
    assert isinstance(parsed, EmailMessage)  # guaranteed by policy.message_factory
    check_headers_safe(parsed)
    return parsed


def _memoised(pol: EmailPolicy[Any]) -> EmailPolicy[Any]:
    """``pol`` with memoised header reads, when that changes nothing but speed."""
    if type(pol) is EmailPolicy and pol.header_factory is _STOCK_HEADERS:
        return OUTPUT_POLICY.clone(**vars(pol))
    return pol


def footable_parts(msg: EmailMessage) -> list[EmailMessage]:
    """List the ``text/plain`` and ``text/html`` parts that must carry the footers.

    Descends ``multipart/*`` only: an attached ``message/rfc822`` is someone else's message and
    stays untouched, as does any part with ``Content-Disposition: attachment``.

    Raises:
        InvalidMessageError: the message is signed or encrypted, a multipart part is malformed,
            or no part can carry a footer.
    """
    parts = list(_walk_footable(msg))
    if not parts:
        raise InvalidMessageError(
            "the message has no text/plain or text/html body part to carry the footers"
        )
    return parts


def _walk_footable(part: EmailMessage) -> Iterator[EmailMessage]:
    ctype = part.get_content_type()
    if ctype in _SEALED:
        raise InvalidMessageError(
            f"cannot add footers inside {ctype}: sign or encrypt after compliance is applied"
        )
    if part.get_content_maintype() == "multipart":
        children = part.get_payload()
        if not isinstance(children, list):
            raise InvalidMessageError(f"malformed {ctype} part (boundary missing or not found)")
        for child in children:
            assert isinstance(child, EmailMessage)  # parsed with OUTPUT_POLICY
            yield from _walk_footable(child)
    elif ctype in ("text/plain", "text/html") and part.get_content_disposition() != "attachment":
        yield part


def add_footer(part: EmailMessage, footer: str) -> None:
    """Add ``footer`` to a text part in place, keeping its charset and transfer encoding.

    ``text/plain``: appended after the body, on a new line. ``text/html``: inserted before the
    last ``</body>`` (any case), else before the last ``</html>``, else at the end; characters
    the part's charset cannot hold become numeric character references, so the charset (which
    may also be declared in a ``<meta>`` tag) never changes. A ``text/plain`` part whose charset
    cannot hold the footer is re-encoded as UTF-8 (base64 stays base64, anything else becomes
    quoted-printable). 7bit becomes quoted-printable only if the result is not 7-bit clean.

    Raises:
        InvalidMessageError: unknown charset or transfer encoding, or a body that is not valid
            in its charset when it has to be re-encoded.
    """
    given = part.get("Content-Transfer-Encoding")
    cte = str(given or "7bit").strip().lower()
    if cte not in _KNOWN_CTE:
        raise InvalidMessageError(f"unsupported Content-Transfer-Encoding {cte!r} in a text part")
    if given is not None and str(given).strip() != str(given):
        # get_payload(decode=True) compares the value unstripped: "base64 " would not be
        # decoded, and the footer would be added to, and the body sent, still encoded.
        part.replace_header("Content-Transfer-Encoding", str(given).strip())
    charset = part.get_content_charset("us-ascii")
    try:
        info = codecs.lookup(charset)
    except LookupError:
        raise InvalidMessageError(f"unknown charset {charset!r} in a text part") from None
    if not getattr(info, "_is_text_encoding", True):  # base64, rot13, hex... (bytes codecs)
        raise InvalidMessageError(f"charset {charset!r} of a text part is not a text encoding")
    codec = info.name
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)  # a non-multipart part always decodes to bytes
    try:
        body = raw.decode(codec, "surrogateescape")
    except UnicodeDecodeError as exc:
        raise InvalidMessageError(f"text part is not valid {charset}: {exc}") from exc
    newline = "\r\n" if "\r\n" in body else "\n"
    footer = footer.replace("\r\n", "\n").replace("\n", newline)
    if part.get_content_subtype() == "html":
        footer = footer.encode(codec, "xmlcharrefreplace").decode(codec)
        body = _insert_html(body, footer)
    else:
        body = append_text_footer(body, footer, newline)
        try:
            footer.encode(codec)
        except UnicodeEncodeError:
            if any("\udc80" <= c <= "\udcff" for c in body):
                raise InvalidMessageError(
                    f"text part is not valid {charset} and the footer needs UTF-8"
                ) from None
            codec = "utf-8"
            set_charset_utf8(part)
            if cte != "base64":
                cte = "quoted-printable"
    _set_body(part, body.encode(codec, "surrogateescape"), cte)


def set_charset_utf8(part: Message) -> None:
    """``part.set_param("charset", "utf-8")``, refusing what the email package cannot write.

    ``set_param`` rebuilds ``Content-Type``, which the generator then folds; folding a
    parameter whose name leaves no room on a line loops forever (CPython gh-138223, open in
    every release up to 3.13): a client's message with such a parameter would hang the relay.

    Raises:
        InvalidMessageError: a ``Content-Type`` parameter name over 40 characters.
    """
    for name, _ in part.get_params(failobj=[]):
        if len(name) > _MAX_PARAM_NAME:
            raise InvalidMessageError(
                f"Content-Type parameter name of {len(name)} characters (at most "
                f"{_MAX_PARAM_NAME}): the footer needs UTF-8 and the email package cannot "
                "rewrite such a header (CPython gh-138223)"
            )
    part.set_param("charset", "utf-8")


@functools.lru_cache(maxsize=4)
def _date_value(second: datetime, offset: timedelta | None) -> str:
    return format_datetime(second)


def date_value(now: datetime) -> str:
    """``format_datetime(now)`` (a naive ``now`` taken as UTC), the value of a ``Date`` field.

    Formatted once a second, not once a message: ``format_datetime`` costs about 15 µs (1% of
    a relayed 2 KB message) and shows whole seconds only. Kept by the second and the UTC
    offset: two times of the same instant in different zones are equal datetimes, but are
    written with their own offsets.
    """
    aware = (now if now.tzinfo else now.replace(tzinfo=UTC)).replace(microsecond=0)
    return _date_value(aware, aware.utcoffset())


#: Bytes a single C call over a big message covers at most (:func:`crlf_only`, the relay's
#: dot-stuffing): about 1 ms, so that a worker thread busy with a 20 MB message gives the GIL
#: back to the event loop every millisecond or so rather than every 10-17 ms.
GIL_PIECE = 1 << 20
_LF = ord("\n")


def crlf_only(data: bytes) -> bool:
    """Whether every CR and LF in ``data`` is part of a CRLF pair (the wire form).

    Counted, not searched with a regex: CRLF pairs cannot overlap, so equal counts of CRLF, LF
    and CR mean there is no lone CR or LF. ``bytes.count`` over 20 MB still takes 10-17 ms
    holding the GIL (36 ms for the three counts), so a big ``data`` is counted in pieces of
    :data:`GIL_PIECE` bytes, without copying (``count``'s start and end): the GIL can change
    hands between pieces.
    """
    size = len(data)
    if size <= GIL_PIECE:
        pairs = data.count(b"\r\n")
        return pairs == data.count(b"\n") and pairs == data.count(b"\r")
    for start in range(0, size, GIL_PIECE):
        end = min(start + GIL_PIECE, size)
        # The pairs that start in [start, end) (the last may end at ``end``), against the CRs
        # in it and the LFs that would end them: those in (start, end], not [start, end).
        pairs = data.count(b"\r\n", start, min(end + 1, size))
        lfs = data.count(b"\n", start, end)
        if start and data[start] == _LF:
            lfs -= 1
        if end < size and data[end] == _LF:
            lfs += 1
        if pairs != lfs or pairs != data.count(b"\r", start, end):
            return False
    return True


def line_pieces(data: bytes, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive pieces of ``data`` of whole lines: each ends just after
    the first LF at least ``size`` bytes past its start, the last at the end of ``data``.

    For work on a big message done a piece at a time (one C call per piece), so that a worker
    thread gives the GIL back between pieces instead of holding it for the whole body.
    """
    start, total = 0, len(data)
    while start < total:
        end = data.find(b"\n", start + size) + 1 if total - start > size else 0
        end = end or total
        yield start, end
        start = end


def insert_html_footer(body: str, footer: str) -> str:
    """Insert ``footer`` before the last ``</body>``, else the last ``</html>``, else at the end."""
    return _insert_html(body, footer)


def append_text_footer(body: str, footer: str, newline: str = "\n") -> str:
    """Append ``footer`` to a text body on a new line, after one blank line."""
    if body and not body.endswith(("\n", "\r")):
        body += newline
    return body + newline + footer if body else footer


def _insert_html(body: str, footer: str) -> str:
    for pattern in (_BODY_END, _HTML_END):
        matches = list(pattern.finditer(body))
        if matches:
            at = matches[-1].start()
            return body[:at] + footer + body[at:]
    return body + footer


def _set_body(part: EmailMessage, data: bytes, cte: str) -> None:
    """Store ``data`` in ``part`` encoded with ``cte`` (or quoted-printable when it must)."""
    if cte in ("7bit", "8bit"):
        too_long = max(map(len, data.splitlines()), default=0) > _MAX_LINE  # CR, LF, CRLF
        if too_long or (cte == "7bit" and not data.isascii()):
            cte = "quoted-printable"
    if cte == "base64":
        payload = base64mime.body_encode(data, maxlinelen=76, eol="\n")
    elif cte == "quoted-printable":
        # latin-1 maps each byte to one code point, which body_encode writes back as =XX.
        payload = quoprimime.body_encode(data.decode("latin-1"), maxlinelen=76, eol="\n")
    else:
        # 7bit/8bit/binary: surrogate escapes make BytesGenerator write the exact bytes.
        payload = data.decode("ascii", "surrogateescape")
    part.set_payload(payload)
    if "Content-Transfer-Encoding" in part:
        if str(part["Content-Transfer-Encoding"]).strip().lower() != cte:
            part.replace_header("Content-Transfer-Encoding", cte)
    elif cte != "7bit":
        part["Content-Transfer-Encoding"] = cte
