"""Transports: hand a finished MIME message to an SMTP server, an outbox folder or memory.

A transport only delivers; every rule (suppression, footers, headers) was applied before it is
called. Each one returns a :class:`Delivery` when the message was accepted and raises
:class:`~prospect_mailer.errors.TransportTemporaryError` (retry later) or
:class:`~prospect_mailer.errors.TransportPermanentError` (do not retry as is) otherwise. Errors from
aiosmtplib and the OS are translated here, at the edge, so callers catch only our types.
"""

from __future__ import annotations

import asyncio
import copy
import email
import email.errors
import email.policy
import os
import re
import ssl
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple, Protocol, TypedDict, Unpack
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.typing import Default

from prospect_mailer.errors import (
    ConfigError,
    TransportError,
    TransportPermanentError,
    TransportTemporaryError,
)
from prospect_mailer.mime import GIL_PIECE, crlf_only, line_pieces

__all__ = [
    "Delivery",
    "MemoryTransport",
    "OutboxTransport",
    "SMTPTransport",
    "SentMessage",
    "Transport",
    "transport_from_settings",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a transport returns when it accepted a message.

    Attributes:
        code: the SMTP reply code to DATA (250), or 250 for the outbox and memory transports.
        reply: the server's reply text, or ``"written to <path>"`` for the outbox.
        transport: ``"smtp"``, ``"outbox"`` or ``"memory"``.
        refused: recipients the server refused while accepting others, as
            ``{address: (code, reply)}``; empty when every recipient was accepted.
    """

    code: int
    reply: str
    transport: str
    refused: Mapping[str, tuple[int, str]] = field(default_factory=lambda: MappingProxyType({}))


class Transport(Protocol):
    """What the pipeline needs from a transport. Implement it to plug in your own."""

    name: str

    async def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> Delivery:
        """Deliver ``message`` to ``recipients`` with envelope sender ``sender``.

        Raises:
            TransportTemporaryError: a failure worth retrying later.
            TransportPermanentError: a refusal that a retry as is will not change.
        """
        ...

    async def close(self) -> None:
        """Release connections and files. The transport may be used again afterwards."""
        ...


# SMTP commands are lines: a CR or LF in an address would end the command early and let the
# rest be read as a new command (SMTP injection); NUL is cut short by some servers.
_UNSAFE_ADDRESS = re.compile(r"[\r\n\x00]")


def _check_envelope(sender: str, recipients: Sequence[str]) -> list[str]:
    if isinstance(recipients, str):  # a bare string would be read as one address per letter
        recipients = [recipients]
    if not recipients:
        raise TransportPermanentError("refused before sending: no recipients")
    for address in (sender, *recipients):
        if _UNSAFE_ADDRESS.search(address):
            raise TransportPermanentError(
                f"refused before sending: address {address!r} contains CR, LF or NUL"
            )
    return list(recipients)


def _by_code(code: int) -> type[TransportError]:
    return TransportPermanentError if 500 <= code <= 599 else TransportTemporaryError


#: An ASCII dot-atom address (``local@domain``, no quoting, comment or display name): what
#: aiosmtplib's ``quote_address`` (``email.utils.parseaddr`` and an injection check, about 50
#: µs per address) returns unchanged between angle brackets, as a property test checks.
PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)
_DEFAULT_TIMEOUT: Any = Default.token  # aiosmtplib's 'the client's own timeout'


class _Replies(Exception):
    """The exchange ended early (connection lost, timeout, bad reply): the replies read so far
    and the error that ended it."""

    def __init__(self, replies: list[aiosmtplib.SMTPResponse], error: Exception) -> None:
        super().__init__(str(error))
        self.replies = replies
        self.error = error


class _PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, able to wait for several replies to one write (RFC 2920).

    aiosmtplib reads one reply per command and drops whatever arrives while no command waits,
    so replies to commands written together would be lost. During :meth:`exchange` this keeps
    every byte and parses each reply as it completes; at any other time it is aiosmtplib's
    protocol, unchanged.
    """

    _batch: list[aiosmtplib.SMTPResponse] | None = None
    _batch_size = 0
    _batch_done: asyncio.Future[None] | None = None
    _batch_wait: float | None = None
    _batch_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._batch is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._parse_batch()

    def _parse_batch(self) -> None:
        batch = self._batch
        assert batch is not None
        had = len(batch)
        while len(batch) < self._batch_size:
            try:
                reply = self._read_response_from_buffer()
            except aiosmtplib.SMTPResponseException as exc:
                self._end_batch(exc)
                return
            if reply is None:
                if len(self._buffer) > MAX_RESPONSE_LENGTH:  # aiosmtplib's limit, per reply
                    self._end_batch(aiosmtplib.SMTPResponseException(-1, "Response too long"))
                elif len(batch) > had:
                    self._arm_timer()  # each reply has its own time, as in aiosmtplib
                return
            batch.append(reply)
        self._end_batch(None)

    def _arm_timer(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
        if self._batch_wait is not None:
            self._batch_timer = self._loop.call_later(
                self._batch_wait,
                self._end_batch,
                aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"),
            )

    def _end_batch(self, error: Exception | None) -> None:
        done = self._batch_done
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: the exchange may already have given up on it

    def connection_lost(self, exc: Exception | None) -> None:
        if self._batch is not None:
            lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self._end_batch(lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        if self._batch is not None:
            self._end_batch(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    async def exchange(
        self, data: bytes, replies: int, wait: float | None
    ) -> list[aiosmtplib.SMTPResponse]:
        """Write ``data`` (one or more commands) and return the next ``replies`` replies.

        ``wait``: the seconds allowed for each reply (restarted by each one, as aiosmtplib
        allows each command's reply its own time).

        Raises:
            _Replies: the connection was lost, the wait timed out or a reply was malformed
                before every reply came; it carries those that did.
        """
        if self._command_lock is None or self.transport is None:
            raise _Replies([], aiosmtplib.SMTPServerDisconnected("Server not connected"))
        async with self._command_lock:
            if self._buffer:  # bytes nobody asked for: the two sides are out of step
                raise _Replies([], aiosmtplib.SMTPServerDisconnected("unexpected server data"))
            batch: list[aiosmtplib.SMTPResponse] = []
            done = self._loop.create_future()
            self._batch, self._batch_size, self._batch_done = batch, replies, done
            self._batch_wait = wait
            self._arm_timer()
            try:
                self.write(data)
                await done
            except aiosmtplib.SMTPException as exc:
                raise _Replies(batch, exc) from None
            finally:
                self._batch, self._batch_done = None, None
                if self._batch_timer is not None:
                    self._batch_timer.cancel()
                    self._batch_timer = None
            return batch


class _Connection(aiosmtplib.SMTP):
    """An aiosmtplib client that knows when it was last used and whether DATA was started.

    ``data_started`` is what makes a retry safe: until DATA is sent the server cannot have
    accepted the message, so resending it on a fresh connection cannot duplicate it.
    """

    def __init__(self, *, generation: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generation = generation
        self.last_used = 0.0
        self.data_started = False

    def adopt_pipelining(self) -> None:
        """Once connected: put :class:`_PipeliningProtocol` in place of aiosmtplib's protocol,
        with the same state on the same transport (TLS and AUTH, if any, are done by then)."""
        old, transport = self.protocol, self.transport
        if type(old) is not SMTPProtocol or transport is None:
            return
        new = _PipeliningProtocol.__new__(_PipeliningProtocol)
        new.__dict__.update(old.__dict__)
        transport.set_protocol(new)
        self.protocol = new

    async def sendmail(
        self,
        sender: str,
        recipients: str | Sequence[str],
        message: str | bytes,
        /,
        *,
        mail_options: Iterable[str] | None = None,
        rcpt_options: Iterable[str] | None = None,
        timeout: Any = _DEFAULT_TIMEOUT,  # noqa: ASYNC109 - aiosmtplib's signature
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """aiosmtplib's ``sendmail``; with a server that offers PIPELINING (RFC 2920), MAIL,
        every RCPT and DATA go in one write and the message once DATA is accepted: two round
        trips instead of three plus one per recipient. Same replies, errors and RSET after a
        refusal. Plain addresses and messages up to 1 MB only; anything else takes the stock
        path."""
        protocol = self.protocol
        if (
            isinstance(protocol, _PipeliningProtocol)
            and isinstance(message, bytes)
            and len(message) <= _BIG_DATA
            and not rcpt_options
            and not isinstance(recipients, str)
            and PLAIN_ADDRESS.fullmatch(sender)
            and all(PLAIN_ADDRESS.fullmatch(r) for r in recipients)
        ):
            await self._ehlo_or_helo_if_needed()
            if self.supports_extension("pipelining"):
                wait = self.timeout if timeout is _DEFAULT_TIMEOUT else timeout
                options = list(mail_options or ())
                return await self._pipelined(protocol, sender, recipients, message, options, wait)
        return await super().sendmail(
            sender,
            recipients,
            message,
            mail_options=mail_options,
            rcpt_options=rcpt_options,
            timeout=timeout,
        )

    async def _pipelined(
        self,
        protocol: _PipeliningProtocol,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        options: list[str],
        wait: float | None,
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        size, content = _prepare_data(message)
        if self.supports_extension("size"):
            options.insert(0, f"size={size}")  # RFC 1870, as aiosmtplib counts it
        mail = b"MAIL FROM:<" + sender.encode("ascii") + b">"
        for option in options:
            arg = option.encode("ascii")
            if COMMAND_INJECTION_REGEX.search(arg):
                raise ValueError("Command arg contains a prohibited control character")
            mail += b" " + arg
        block = [mail + b"\r\n"]
        block += [b"RCPT TO:<" + r.encode("ascii") + b">\r\n" for r in recipients]
        block.append(b"DATA\r\n")
        try:
            replies = await protocol.exchange(b"".join(block), len(block), wait)
        except _Replies as ended:
            self.close()  # out of step with the server, or gone: never reused
            # A refusal read before the end is the answer (a server that says 421 to MAIL
            # and hangs up); otherwise the failure itself.
            refusal, _ = _envelope_replies(ended.replies, sender, recipients)
            raise (refusal or ended.error) from None
        refusal, refused = _envelope_replies(replies, sender, recipients)
        if refusal is not None:
            if replies[-1].code == aiosmtplib.SMTPStatus.start_input:
                # RFC 2920 3.1: DATA accepted although the envelope failed: end it, empty.
                await self._quietly(protocol.exchange(b".\r\n", 1, wait))
            await self._after_refusal(replies, wait)
            raise refusal
        self.data_started = True
        try:
            (reply,) = await protocol.exchange(content, 1, wait)
        except _Replies as ended:
            self.close()
            raise ended.error from None
        if reply.code != aiosmtplib.SMTPStatus.completed:
            await self._after_refusal([reply], wait)
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return refused, reply.message

    async def _after_refusal(
        self, replies: list[aiosmtplib.SMTPResponse], wait: float | None
    ) -> None:
        """What aiosmtplib does after a refused command: close on 421, else RSET (best effort)."""
        if any(r.code == aiosmtplib.SMTPStatus.domain_unavailable for r in replies):
            self.close()
            return
        await self._quietly(self.rset(timeout=wait))

    async def _quietly(self, step: Awaitable[object]) -> None:
        try:
            await step
        except (_Replies, ConnectionError, aiosmtplib.SMTPResponseException):
            self.close()

    async def mail(
        self,
        sender: str,
        /,
        *,
        options: Iterable[str] | None = None,
        encoding: str = "ascii",
        timeout: Any = _DEFAULT_TIMEOUT,  # noqa: ASYNC109 - aiosmtplib's signature
    ) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's MAIL, without its address parse for a plain address (see
        :data:`PLAIN_ADDRESS`): the same command bytes, replies and errors."""
        if not PLAIN_ADDRESS.fullmatch(sender):
            return await super().mail(sender, options=options, encoding=encoding, timeout=timeout)
        response = await self._plain(b"MAIL", b"FROM:", sender, options, encoding, timeout)
        if response.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
        return response

    async def rcpt(
        self,
        recipient: str,
        /,
        *,
        options: Iterable[str] | None = None,
        encoding: str = "ascii",
        timeout: Any = _DEFAULT_TIMEOUT,  # noqa: ASYNC109 - aiosmtplib's signature
    ) -> aiosmtplib.SMTPResponse:
        """aiosmtplib's RCPT, without its address parse for a plain address."""
        if not PLAIN_ADDRESS.fullmatch(recipient):
            return await super().rcpt(
                recipient, options=options, encoding=encoding, timeout=timeout
            )
        response = await self._plain(b"RCPT", b"TO:", recipient, options, encoding, timeout)
        if response.code not in (
            aiosmtplib.SMTPStatus.completed,
            aiosmtplib.SMTPStatus.will_forward,
        ):
            raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
        return response

    async def _plain(
        self,
        verb: bytes,
        prefix: bytes,
        address: str,
        options: Iterable[str] | None,
        encoding: str,
        timeout: Any,  # noqa: ASYNC109 - passed on to aiosmtplib
    ) -> aiosmtplib.SMTPResponse:
        """``VERB prefix<address> options`` for a plain address, as aiosmtplib writes it."""
        await self._ehlo_or_helo_if_needed()
        args = [prefix + b"<" + address.encode(encoding) + b">"]
        args += [option.encode("ascii") for option in options or ()]
        return await self.execute_command(verb, *args, timeout=timeout)

    async def data(self, *args: Any, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        self.data_started = True
        message = args[0] if args else None
        protocol = self.protocol
        if (
            isinstance(message, bytes)
            and len(message) > _BIG_DATA
            and isinstance(protocol, _PipeliningProtocol)
        ):
            wait = kwargs.get("timeout", self.timeout)
            if not isinstance(wait, int | float) and wait is not None:
                wait = self.timeout  # aiosmtplib's "default" sentinel
            return await self._big_data(protocol, message, wait)
        return await super().data(*args, **kwargs)

    async def _big_data(
        self, protocol: _PipeliningProtocol, message: bytes, wait: float | None
    ) -> aiosmtplib.SMTPResponse:
        """DATA for a big message, its line-end fixing and dot-stuffing done in a thread.

        aiosmtplib does both with regexes on the event loop: for 20 MB that holds every other
        session for about half a second. Same bytes on the wire, same replies and errors (a
        lost connection or a timeout closes it, as aiosmtplib does).
        """
        _, prepared = await asyncio.to_thread(_prepare_data, message)
        reply: aiosmtplib.SMTPResponse | None = None
        for data, expected in (
            (b"DATA\r\n", aiosmtplib.SMTPStatus.start_input),
            (prepared, aiosmtplib.SMTPStatus.completed),
        ):
            try:
                (reply,) = await protocol.exchange(data, 1, wait)
            except _Replies as ended:
                self.close()
                raise ended.error from None
            if reply.code != expected:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        assert reply is not None
        return reply


def _envelope_replies(
    replies: Sequence[aiosmtplib.SMTPResponse], sender: str, recipients: Sequence[str]
) -> tuple[aiosmtplib.SMTPException | None, dict[str, aiosmtplib.SMTPResponse]]:
    """The replies to MAIL, each RCPT and DATA (or the first of them, if the rest never came)
    judged as aiosmtplib's ``sendmail`` judges them one by one: the error it would raise (or
    ``None``), and the recipients refused while others were accepted."""
    if not replies:
        return None, {}
    mail, rest = replies[0], replies[1:]
    if mail.code != aiosmtplib.SMTPStatus.completed:
        return aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender), {}
    refused = [
        aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
        for address, reply in zip(recipients, rest, strict=False)
        if reply.code not in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward)
    ]
    if len(rest) < len(recipients):
        return None, {}
    if len(refused) == len(recipients):
        return aiosmtplib.SMTPRecipientsRefused(refused), {}
    if len(rest) > len(recipients) and rest[-1].code != aiosmtplib.SMTPStatus.start_input:
        return aiosmtplib.SMTPDataError(rest[-1].code, rest[-1].message), {}
    return None, {e.recipient: aiosmtplib.SMTPResponse(e.code, e.message) for e in refused}


#: Messages larger than this have their DATA prepared off the event loop.
_BIG_DATA = 1024 * 1024


def _prepare_data(message: bytes) -> tuple[int, bytes]:
    """What aiosmtplib sends after DATA: CRLF line ends, leading dots doubled, then ``.``;
    with the message's size as RFC 1870 counts it (CRLF line ends, before dot-stuffing).

    Runs in a worker thread, but a regex over 20 MB is one long C call that holds the GIL (and
    so every other session) for a quarter of a second. Messages already in wire form (every
    line end a CRLF: what the relay accepts and the composers write) need no line-end fixing,
    and their dot-stuffing is a ``bytes.replace``: memchr-fast, the same bytes.
    """
    if not crlf_only(message):
        message = normalize_message_line_endings(message)
        return len(message), PERIOD_REGEX.sub(b"..", message) + b".\r\n"
    ending = b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n"
    # In pieces of whole lines (each starts a line: a leading dot is doubled by hand), about
    # GIL_PIECE bytes each: one replace over 20 MB holds the GIL for 14 ms, a piece for 1.
    pieces: list[bytes] = []
    for start, end in line_pieces(message, GIL_PIECE):
        piece = message[start:end].replace(b"\r\n.", b"\r\n..")
        pieces += (b".", piece) if piece.startswith(b".") else (piece,)
    pieces.append(ending)
    return len(message) + len(ending) - 3, b"".join(pieces)


class _SMTPOptions(TypedDict, total=False):
    tls_context: ssl.SSLContext | None
    timeout: float
    pool_size: int
    max_idle: float
    local_hostname: str | None


def wire_bytes(message: EmailMessage | bytes) -> bytes:
    """Serialise ``message`` as sent on the wire (CRLF), with the message's own policy.

    Bytes are taken as already in wire form (the library's fast path writes them so).

    ``email.policy.SMTP`` (what aiosmtplib's ``send_message`` uses) re-wraps every header longer
    than 78 characters, so attachment headers would not come out byte-identical; the compliance
    step's policy never refolds a header it parsed.
    """
    if isinstance(message, bytes | bytearray):
        return bytes(message)
    if "Bcc" in message or "Resent-Bcc" in message:
        # Blind copies travel in the envelope only; never in the header (RFC 5322 3.6.3).
        message = copy.deepcopy(message)
        del message["Bcc"]
        del message["Resent-Bcc"]
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def _mail_options(
    conn: aiosmtplib.SMTP, sender: str, rcpts: Sequence[str], data: bytes
) -> list[str]:
    options = []
    if not all(a.isascii() for a in (sender, *rcpts)):
        options.append("SMTPUTF8")  # RFC 6531: non-ASCII local parts need it
    if not data.isascii() and conn.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    return options


class SMTPTransport:
    """Send through an SMTP server, reusing a small pool of connections.

    Up to ``pool_size`` messages are sent at once, each on its own connection; a connection is
    reused for the next message, so a batch costs one handshake (TLS, AUTH) per connection, not
    per message. A connection the server closed while idle is noticed and replaced without sending
    anything twice. After any error the connection is dropped, never reused. When the server
    offers PIPELINING (RFC 2920), the envelope (MAIL, every RCPT, DATA) goes in one write and
    the message once DATA is accepted: two round trips per message instead of 3 + recipients.

    Args:
        host: server name or IP address.
        port: server port.
        username: login name; AUTH is done on connect when given.
        password: login password. It never appears in ``repr()`` or error messages.
        use_tls: connect with TLS from the start (SMTPS, usually port 465).
        start_tls: ``True`` requires STARTTLS, ``False`` never upgrades, ``None`` upgrades when
            the server offers it. With credentials, prefer ``use_tls`` or ``start_tls=True`` so
            that a server that stops offering STARTTLS does not receive them in clear.
        tls_context: the context used to verify the server (default: system trust store).
        timeout: seconds allowed for connecting and for each SMTP command.
        pool_size: the most connections open at once.
        max_idle: a pooled connection idle longer than this is checked with NOOP before reuse.
        local_hostname: the name sent in EHLO (default: this machine's FQDN).

    Raises:
        ConfigError: ``use_tls`` and ``start_tls=True`` together, or a bad ``pool_size``.
    """

    name: str = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool = False,
        start_tls: bool | None = None,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 30,
        pool_size: int = 4,
        max_idle: float = 30,
        local_hostname: str | None = None,
    ) -> None:
        if use_tls and start_tls:
            raise ConfigError("SMTP: use_tls (implicit TLS) and start_tls=True exclude each other")
        if pool_size < 1:
            raise ConfigError(f"SMTP: pool_size must be at least 1, not {pool_size}")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.use_tls = use_tls
        self.start_tls = False if use_tls else start_tls
        self.tls_context = tls_context
        self.timeout = timeout
        self.pool_size = pool_size
        self.max_idle = max_idle
        self.local_hostname = local_hostname
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Connection] = []  # LIFO: the most recently used is the likeliest alive
        self._generation = 0  # bumped by close(); older connections are not pooled again

    @classmethod
    def from_url(cls, url: str, **options: Unpack[_SMTPOptions]) -> SMTPTransport:
        """Build a transport from ``smtp://``, ``smtps://`` or ``smtp+starttls://`` URLs.

        ``smtp://user:pass@host:port`` (default port 25, STARTTLS if offered),
        ``smtps://...`` (implicit TLS, default port 465), ``smtp+starttls://...`` (STARTTLS
        required, default port 587). Credentials are percent-decoded, so encode ``@ : / # ?``.
        ``options`` are the constructor's: tls_context, timeout, pool_size, max_idle,
        local_hostname.

        Raises:
            ConfigError: naming the part of the URL at fault (never echoing the password).
        """
        try:
            parts = urlsplit(url.strip())
        except ValueError as exc:  # e.g. an unbalanced "[" in an IPv6 host
            raise ConfigError(f"SMTP URL: the host part is malformed ({exc})") from None
        schemes = {"smtp": (False, None, 25), "smtps": (True, False, 465)}
        schemes["smtp+starttls"] = (False, True, 587)
        scheme = parts.scheme.lower()
        if scheme not in schemes:
            raise ConfigError(
                f"SMTP URL: scheme {scheme!r} is not supported; "
                "use smtp://, smtps:// or smtp+starttls://"
            )
        use_tls, start_tls, default_port = schemes[scheme]
        try:
            port = parts.port
        except ValueError:  # its message may quote a mangled netloc, which can hold the password
            raise ConfigError(
                "SMTP URL: the port is not a number from 1 to 65535 "
                "(percent-encode '/', '#', '?' and '@' in the user name and password)"
            ) from None
        if port == 0:
            raise ConfigError("SMTP URL: the port is not a number from 1 to 65535")
        if not parts.hostname:
            raise ConfigError("SMTP URL: the host is missing")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError("SMTP URL: a path, query or fragment is not allowed")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if password is not None and username is None:
            raise ConfigError("SMTP URL: a password is given without a user name")
        return cls(
            parts.hostname,
            port or default_port,
            username=username,
            password=password,
            use_tls=use_tls,
            start_tls=start_tls,
            **options,
        )

    def __repr__(self) -> str:
        if self.use_tls:
            tls = "implicit"
        else:
            tls = {True: "starttls", False: "none", None: "starttls-if-offered"}[self.start_tls]
        return (
            f"SMTPTransport(host={self.host!r}, port={self.port}, tls={tls!r}, "
            f"username={self.username!r}, pool_size={self.pool_size})"
        )

    async def __aenter__(self) -> SMTPTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> Delivery:
        """Send ``message`` with the given envelope (``Bcc`` headers are not transmitted).

        Returns:
            a :class:`Delivery`; ``refused`` lists recipients refused while others were accepted.

        Raises:
            TransportTemporaryError: 4xx reply, timeout, connection refused or lost.
            TransportPermanentError: 5xx reply, failed authentication, every recipient refused
                with 5xx, or an address with CR/LF/NUL (refused before connecting).
        """
        rcpts = _check_envelope(sender, recipients)
        async with self._slots:
            conn: _Connection | None = None
            try:
                conn, reused = await self._checkout()
                data = wire_bytes(message)
                options = _mail_options(conn, sender, rcpts, data)
                try:
                    conn.data_started = False
                    refused, reply = await conn.sendmail(sender, rcpts, data, mail_options=options)
                except Exception as exc:
                    if not (reused and _closed_before_data(exc, conn)):
                        raise
                    # The server dropped this pooled connection while it sat idle (its timeout,
                    # a restart). Nothing was accepted, so one retry on a fresh one is safe.
                    conn.close()
                    conn = await self._open()
                    options = _mail_options(conn, sender, rcpts, data)
                    refused, reply = await conn.sendmail(sender, rcpts, data, mail_options=options)
            except BaseException as exc:
                if conn is not None:
                    conn.close()  # mid-transaction state is unknown: never pool it again
                if isinstance(exc, Exception):
                    raise self._translate(exc) from exc
                raise
            self._checkin(conn)
        return Delivery(
            code=250,
            reply=reply,
            transport=self.name,
            refused=MappingProxyType({a: (r.code, r.message) for a, r in refused.items()}),
        )

    async def close(self) -> None:
        """QUIT and close every pooled connection; connections in use close when done."""
        self._generation += 1
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    async def _quit(self, conn: _Connection) -> None:
        try:
            if conn.is_connected:
                await conn.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass  # the server may be gone already; closing our side is what matters
        finally:
            conn.close()

    async def _open(self) -> _Connection:
        conn = _Connection(
            generation=self._generation,
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self._password,
            use_tls=self.use_tls,
            start_tls=self.start_tls,
            tls_context=self.tls_context,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
        )
        await conn.connect()
        conn.adopt_pipelining()
        if self.local_hostname is None:  # aiosmtplib looks the FQDN up per client: once is enough
            self.local_hostname = conn.local_hostname
        return conn

    async def _checkout(self) -> tuple[_Connection, bool]:
        """An idle connection believed alive (reused=True), else a new one (reused=False)."""
        loop = asyncio.get_running_loop()
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_connected:  # the server closed it and we already saw the EOF
                conn.close()
                continue
            if loop.time() - conn.last_used > self.max_idle:
                try:  # servers drop idle clients (Postfix after 300 s): ask before trusting it
                    await conn.noop()
                except (aiosmtplib.SMTPException, OSError):
                    conn.close()
                    continue
            return conn, True
        return await self._open(), False

    def _checkin(self, conn: _Connection) -> None:
        if not conn.is_connected or conn.generation != self._generation:
            conn.close()
            return
        conn.last_used = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def _translate(self, exc: Exception) -> TransportError:
        """Map one aiosmtplib/OS error to ours, in one place (as httpx maps httpcore's)."""
        kind: type[TransportError] = TransportTemporaryError
        code: int | None = None
        reply = ""
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            kind, code, reply = TransportPermanentError, exc.code, exc.message
            text = f"authentication failed for user {self.username!r}: {code} {reply}"
        elif isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            # Permanent only if no refusal was temporary: a 4xx one may succeed later.
            worst = next((r for r in exc.recipients if r.code < 500), exc.recipients[0])
            kind, code, reply = _by_code(worst.code), worst.code, worst.message
            text = f"every recipient was refused: {detail}"
        elif isinstance(exc, aiosmtplib.SMTPResponseException):
            kind, code, reply = _by_code(exc.code), exc.code, exc.message
            text = f"{type(exc).__name__.removeprefix('SMTP')}: {code} {reply}"
        elif isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
            text = f"timed out ({exc}); if DATA was sent, the message may have been accepted"
        elif isinstance(exc, aiosmtplib.SMTPNotSupported | ValueError):
            kind, text = TransportPermanentError, f"cannot send: {exc}"
        elif isinstance(exc, OSError):  # includes ConnectionError and ssl.SSLError
            text = f"connection failed: {exc}"
        elif isinstance(exc, aiosmtplib.SMTPException):  # e.g. STARTTLS or AUTH not offered
            kind, text = TransportPermanentError, str(exc)
        else:
            text = f"{type(exc).__name__}: {exc}"
        where = f"SMTP {self.host}:{self.port}"
        return kind(self._redact(f"{where}: {text}"), code=code, reply=self._redact(reply))

    def _redact(self, text: str) -> str:
        # Belt and braces: no server or library message should echo the password, but if one
        # ever does, it must not reach logs and audit records through our errors.
        return text.replace(self._password, "***") if self._password else text


def _closed_before_data(exc: Exception, conn: _Connection) -> bool:
    """True if a reused connection turned out dead before anything could have been accepted."""
    if conn.data_started:
        return False
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421  # "service closing": what a server says as it drops a client
    return isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)


class OutboxTransport:
    """Write each message to a folder as an ``.eml`` file instead of sending it.

    The default transport: nothing leaves the machine until you configure SMTP. Files are named
    ``<UTC timestamp>-<Message-ID or uuid>.eml`` (so they sort by time), hold the message bytes
    exactly as they would go on the wire (CRLF line endings), and appear atomically: written to a
    hidden temporary file in the same folder, flushed to disk, then renamed. The envelope is not
    recorded; the message is not altered.

    Args:
        directory: the folder; created on first use.
    """

    name: str = "outbox"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        # Naming and renaming under one lock: two messages with the same Message-ID written in
        # the same microsecond by two threads must not overwrite each other.
        self._rename_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OutboxTransport(directory={str(self.directory)!r})"

    async def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> Delivery:
        """Write ``message`` to the outbox; ``sender`` and ``recipients`` are only checked.

        Raises:
            TransportTemporaryError: the file could not be written (permissions, disk full).
            TransportPermanentError: an address with CR/LF/NUL, or a message that cannot be
                serialised.
        """
        _check_envelope(sender, recipients)
        try:
            data = wire_bytes(message)
        except (ValueError, email.errors.MessageError) as exc:
            raise TransportPermanentError(f"outbox: cannot serialise message: {exc}") from exc
        stem = _safe_stem(_message_id(message))
        try:
            path = await asyncio.to_thread(self._write, data, stem)
        except OSError as exc:
            raise TransportTemporaryError(
                f"outbox: cannot write to {self.directory}: {exc.strerror or exc}"
            ) from exc
        return Delivery(code=250, reply=f"written to {path}", transport=self.name)

    async def close(self) -> None:
        """Nothing to release: every file is closed when ``send`` returns."""

    def _write(self, data: bytes, stem: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A leading dot and a non-.eml suffix keep readers that glob "*.eml" off partial files.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with open(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            with self._rename_lock:
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
                target = self.directory / f"{stamp}-{stem}.eml"
                if target.exists():
                    target = self.directory / f"{stamp}-{stem}-{uuid.uuid4().hex}.eml"
                os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if os.name == "posix":  # make the rename itself durable; Windows cannot open a folder
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return target


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]{1,250}>)", re.IGNORECASE | re.MULTILINE)


def _message_id(message: EmailMessage | bytes) -> str | None:
    if isinstance(message, bytes | bytearray):
        head = bytes(message).split(b"\r\n\r\n", 1)[0]
        m = _MESSAGE_ID.search(head)
        return m.group(1).decode("ascii", "replace") if m else None
    value = message.get("Message-ID")
    return None if value is None else str(value)


def _safe_stem(message_id: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9._@+=-]", "_", (message_id or "").strip().strip("<>"))[:100]
    return stem.lstrip(".") or uuid.uuid4().hex


class SentMessage(NamedTuple):
    """One message kept by :class:`MemoryTransport`."""

    sender: str
    recipients: tuple[str, ...]
    message: EmailMessage


class MemoryTransport:
    """Keep messages in a list instead of sending them: for your own tests.

    Attributes:
        sent: every accepted message, oldest first, as :class:`SentMessage`
            ``(sender, recipients, message)`` tuples.
    """

    name: str = "memory"

    def __init__(self) -> None:
        self.sent: list[SentMessage] = []
        self._failures: list[TransportError] = []

    def fail_next(self, count: int = 1, error: TransportError | None = None) -> None:
        """Make the next ``count`` sends raise ``error`` (default: a temporary error)."""
        for _ in range(count):
            self._failures.append(
                error or TransportTemporaryError("memory: simulated failure", code=451)
            )

    async def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> Delivery:
        """Record the message, or raise the next failure set with :meth:`fail_next`.

        Raises:
            TransportError: as configured with :meth:`fail_next`.
            TransportPermanentError: an address with CR/LF/NUL (as the other transports do).
        """
        rcpts = _check_envelope(sender, recipients)
        if self._failures:
            raise self._failures.pop(0)
        if isinstance(message, bytes | bytearray):
            # Local line ends, as a receiving MTA would hand the message on.
            local = bytes(message).replace(b"\r\n", b"\n")
            parsed = email.message_from_bytes(local, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            message = parsed
        self.sent.append(SentMessage(sender, tuple(rcpts), message))
        return Delivery(code=250, reply="kept in memory", transport=self.name)

    async def close(self) -> None:
        """Nothing to release."""


async def transport_from_settings(smtp_url: str | None, outbox_dir: str | Path) -> Transport:
    """An :class:`SMTPTransport` for ``smtp_url`` if given, else an :class:`OutboxTransport`.

    No connection is made here; the first send connects.

    Raises:
        ConfigError: ``smtp_url`` is malformed.
    """
    if smtp_url:
        return SMTPTransport.from_url(smtp_url)
    return OutboxTransport(outbox_dir)
