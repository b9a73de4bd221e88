"""Real SMTP servers for tests: aiosmtpd on 127.0.0.1, an ephemeral port, in the test's loop.

Modeled on aiosmtplib's ``tests/smtpd.py``: the server is created with ``loop.create_server`` in
the running loop (not aiosmtpd's thread-based ``Controller``), so a test can stop, restart and
inspect it between two awaits without races, and nothing runs in another thread.

Fixtures (function scope unless said otherwise)::

    smtpd_server               plain SMTP, no TLS, no AUTH
    smtpd_tls_server           STARTTLS and AUTH both required (submission, port-587 style)
    smtpd_implicit_tls_server  TLS from the first byte (SMTPS, port-465 style), AUTH offered
    smtp_ca                    (session) the in-memory trustme CA that signed the server cert
    smtp_server_tls_context    (session) the servers' ssl.SSLContext
    smtp_client_tls_context    (session) a client context that trusts ``smtp_ca``

Each server fixture yields an :class:`SMTPTestServer`::

    async def test_send(smtpd_server):
        transport = SMTPTransport(smtpd_server.host, smtpd_server.port)
        ...
        mail_from, rcpt_tos, data = smtpd_server.messages[0]   # data: raw bytes, CRLF
        assert smtpd_server.connections == 1

Recorded: ``messages`` (:class:`ReceivedMessage`), ``commands`` (``(verb, argument)``),
``ahead`` (``(verb, bytes the client had sent beyond it)``: pipelined commands),
``replies`` (every line the server sent), ``connections`` (accepted so far),
``open_connections`` (open now), ``auth_attempts`` (``(mechanism, login, success)``).
TLS servers also expose ``username``, ``password`` and ``client_tls_context``.

Faults, chosen by a marker (kinds in :data:`FAULT_KINDS`; ``reply=`` and ``delay=`` override)::

    @pytest.mark.smtp_fault("rcpt_5xx")
    @pytest.mark.smtp_fault("slow_data", delay=2.0)
    @pytest.mark.smtp_fault("data_4xx", reply="452 4.3.1 out of memory")

or set at run time on the server object (they take effect at the next command)::

    server.fail_rcpt = {"x@y.com": "550 5.1.1 no such user"}  # per recipient
    server.rcpt_reply / server.fail_mail / server.data_reply = "4xx/5xx ..."  # every one
    server.data_delay = 2.0            # seconds before replying to the message content
    server.pipelining = False          # do not offer PIPELINING (new connections)
    server.disconnect_on_data = True   # drop the connection once the content is received
    server.drop_on_mail = 1            # drop the connection on the next N MAIL commands
    server.fail_after_n_messages = 3   # then reply ``after_n_reply`` (421, closing) to MAIL
    server.idle_timeout = 0.2          # close connections idle that long (new connections)
    await server.drop_connections()    # abort every open connection, keep listening
    await server.stop(); await server.start()   # die mid-batch, come back on the same port

Nothing here emits a warning (``filterwarnings = error``): aiosmtpd warns when AUTH is required
without TLS, so the servers require TLS for AUTH, or do not require AUTH at all. (aiosmtpd still
*logs* "Session.login_data is deprecated" on each successful AUTH: its own code, a log record,
not a warning.) aiosmtpd quirks: a null sender ``MAIL FROM:<>`` is recorded as ``"<>"``, not
``""``; and implicit TLS does not count as TLS for ``auth_require_tls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, AnyStr, NamedTuple

import pytest
import pytest_asyncio
import trustme
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

__all__ = ["FAULT_KINDS", "ReceivedMessage", "SMTPTestServer"]

#: marker kind -> (server attribute, default value); ``reply=``/``delay=`` replace the value.
FAULT_KINDS: dict[str, tuple[str, object]] = {
    "mail_4xx": ("fail_mail", "451 4.3.0 sender check failed, try later"),
    "mail_5xx": ("fail_mail", "553 5.7.1 sender refused"),
    "rcpt_4xx": ("rcpt_reply", "450 4.2.1 mailbox busy, try later"),
    "rcpt_5xx": ("rcpt_reply", "550 5.1.1 no such user"),
    "data_4xx": ("data_reply", "451 4.3.0 temporary failure, try later"),
    "data_5xx": ("data_reply", "554 5.6.0 message refused"),
    "disconnect_on_data": ("disconnect_on_data", True),
    "drop_on_mail": ("drop_on_mail", 1),
    "slow_data": ("data_delay", 5.0),  # longer than the client timeouts used in tests
}


class ReceivedMessage(NamedTuple):
    """One message the server accepted: unpacks as ``(mail_from, rcpt_tos, data)``."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly the bytes after DATA, dot-unstuffed, CRLF line endings


class SMTPTestServer:
    """An aiosmtpd server that records everything and fails on request.

    It is also the aiosmtpd *handler* (the ``handle_*`` hooks below), so recordings and fault
    switches live on one object. Create it through the fixtures; ``start()`` binds
    127.0.0.1 on an ephemeral port (then keeps that port across ``stop()``/``start()``).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        auth_required: bool = False,
        client_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.port = 0
        self._starttls_context = starttls_context
        self._implicit_tls_context = implicit_tls_context
        self.username: str | None = auth[0] if auth else None
        self.password: str | None = auth[1] if auth else None
        self._auth_required = auth_required
        self.client_tls_context = client_tls_context
        # recordings
        self.messages: list[ReceivedMessage] = []
        self.commands: list[tuple[str, str | None]] = []
        self.replies: list[str] = []
        self.ahead: list[tuple[str, bytes]] = []  # (verb, bytes already received after it)
        self.auth_attempts: list[tuple[str, str, bool]] = []  # (mechanism, login, success)
        self.connections = 0
        # faults
        self.fail_mail: str | None = None
        self.fail_rcpt: dict[str, str] = {}
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.data_delay = 0.0
        self.disconnect_on_data = False
        self.drop_on_mail = 0
        self.fail_after_n_messages: int | None = None
        self.after_n_reply = "421 4.3.2 service shutting down"
        self.idle_timeout = 300.0
        # Offer PIPELINING (RFC 2920) in EHLO, as Postfix does; aiosmtpd reads pipelined
        # commands one by one anyway. False: the client must wait for each reply.
        self.pipelining = True
        self._server: asyncio.Server | None = None
        self._sessions: set[_RecordingSMTP] = set()

    @property
    def open_connections(self) -> int:
        """Client connections open right now."""
        return len(self._sessions)

    def commands_named(self, verb: str) -> list[str | None]:
        """Arguments of every recorded command ``verb`` (e.g. ``"MAIL"``), in order."""
        return [arg for name, arg in self.commands if name == verb.upper()]

    async def start(self) -> None:
        """Listen (again) on 127.0.0.1; the first start picks a free port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_session,
            host=self.host,
            port=self.port,
            family=socket.AF_INET,
            ssl=self._implicit_tls_context,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and abort open connections: the server 'dies'."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.drop_connections()
        if server is not None:
            await server.wait_closed()

    async def drop_connections(self) -> None:
        """Abort every open connection (no reply, no QUIT) but keep listening."""
        for session in list(self._sessions):
            session.abort()
        # Wait until each session's connection_lost ran, so no socket outlives the test.
        for _ in range(200):
            if not self._sessions:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{len(self._sessions)} SMTP test session(s) did not close")

    def _make_session(self) -> _RecordingSMTP:
        return _RecordingSMTP(
            self,
            hostname="localhost",  # else aiosmtpd calls the blocking socket.getfqdn()
            loop=asyncio.get_running_loop(),
            enable_SMTPUTF8=True,
            tls_context=self._starttls_context,
            require_starttls=self._starttls_context is not None,
            # Requiring AUTH without requiring TLS for it makes aiosmtpd warn; the implicit-TLS
            # server (whose TLS aiosmtpd does not see as such) therefore only offers AUTH.
            auth_required=self._auth_required,
            auth_require_tls=self._starttls_context is not None,
            authenticator=self._authenticate if self.username else None,
            timeout=self.idle_timeout,
        )

    def _authenticate(
        self, server: AiosmtpdSMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = False
        login = ""
        if isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "replace")
            ok = login == self.username and data.password.decode("utf-8", "replace") == (
                self.password
            )
        self.auth_attempts.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False)

    # aiosmtpd handler hooks

    async def handle_EHLO(
        self,
        server: AiosmtpdSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # this hook's job, once it exists
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the last line, "250 HELP"
        return responses

    async def handle_MAIL(
        self,
        server: _RecordingSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.drop_on_mail > 0:
            self.drop_on_mail -= 1
            await server.abort_and_wait()
        if self.fail_after_n_messages is not None and (
            len(self.messages) >= self.fail_after_n_messages
        ):
            if self.after_n_reply.startswith("421"):  # 421 means "closing": do close after it
                asyncio.get_running_loop().call_soon(server.close_transport)
            return self.after_n_reply
        if self.fail_mail:
            return self.fail_mail
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: _RecordingSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.fail_rcpt.get(address) or self.fail_rcpt.get(address.lower())
        if reply or self.rcpt_reply:
            return reply or self.rcpt_reply or ""
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope
    ) -> str:
        if self.disconnect_on_data:
            await server.abort_and_wait()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        content = envelope.original_content
        assert isinstance(content, bytes)
        self.messages.append(
            ReceivedMessage(envelope.mail_from or "", list(envelope.rcpt_tos), content)
        )
        return f"250 2.0.0 OK queued as test-{len(self.messages)}"


def _recorded(verb: str) -> Callable[..., Coroutine[Any, Any, None]]:
    original = getattr(AiosmtpdSMTP, f"smtp_{verb}")

    @functools.wraps(original)  # keeps aiosmtpd's @syntax attributes, which HELP reads
    async def method(self: _RecordingSMTP, arg: str | None) -> None:
        self.owner.commands.append((verb, arg))
        # What the client had already sent beyond this command: pipelined commands.
        self.owner.ahead.append((verb, bytes(getattr(self._reader, "_buffer", b""))))
        await original(self, arg)

    return method


class _RecordingSMTP(AiosmtpdSMTP):
    """One server-side session: records commands and replies, counts connections."""

    def __init__(self, owner: SMTPTestServer, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # called again after STARTTLS: that is no new client
        super().connection_made(transport)
        if first:
            self.owner.connections += 1
            self.owner._sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.owner._sessions.discard(self)

    async def push(self, status: AnyStr) -> None:
        self.owner.replies.append(status if isinstance(status, str) else status.decode())
        await super().push(status)

    def abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None:  # asyncio's, or another loop's (uvloop's are not
                transport.abort()  # asyncio.Transport subclasses)

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def abort_and_wait(self) -> None:
        """Drop the client with no reply; connection_lost then cancels this session's task."""
        self.abort()
        await asyncio.get_running_loop().create_future()


for _verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS", "AUTH"):
    setattr(_RecordingSMTP, f"smtp_{_verb}", _recorded(_verb))


def _apply_fault_markers(server: SMTPTestServer, request: pytest.FixtureRequest) -> None:
    for marker in request.node.iter_markers("smtp_fault"):
        if len(marker.args) != 1 or marker.args[0] not in FAULT_KINDS:
            raise pytest.UsageError(
                f"smtp_fault needs one kind among {sorted(FAULT_KINDS)}, got {marker.args!r}"
            )
        attribute, value = FAULT_KINDS[marker.args[0]]
        value = marker.kwargs.get("reply", marker.kwargs.get("delay", value))
        setattr(server, attribute, value)


@contextlib.asynccontextmanager
async def _serving(
    server: SMTPTestServer, request: pytest.FixtureRequest
) -> AsyncIterator[SMTPTestServer]:
    _apply_fault_markers(server, request)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def smtp_ca() -> trustme.CA:
    """An in-memory certificate authority; nothing touches the disk."""
    return trustme.CA()


@pytest.fixture(scope="session")
def smtp_server_tls_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    """Server context with a certificate for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    smtp_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def smtp_client_tls_context(smtp_ca: trustme.CA) -> ssl.SSLContext:
    """Client context that verifies the test servers' certificate (and hostname)."""
    context = ssl.create_default_context()
    smtp_ca.configure_trust(context)
    return context


@pytest_asyncio.fixture
async def smtpd_server(request: pytest.FixtureRequest) -> AsyncIterator[SMTPTestServer]:
    """Plain SMTP server (no TLS, no AUTH), faults from ``smtp_fault`` markers."""
    async with _serving(SMTPTestServer(), request) as server:
        yield server


@pytest_asyncio.fixture
async def smtpd_tls_server(
    request: pytest.FixtureRequest,
    smtp_server_tls_context: ssl.SSLContext,
    smtp_client_tls_context: ssl.SSLContext,
) -> AsyncIterator[SMTPTestServer]:
    """STARTTLS required, then AUTH (PLAIN, LOGIN) required as ``.username``/``.password``."""
    server = SMTPTestServer(
        starttls_context=smtp_server_tls_context,
        auth=("prospect", "correct horse battery staple"),
        auth_required=True,
        client_tls_context=smtp_client_tls_context,
    )
    async with _serving(server, request) as running:
        yield running


@pytest_asyncio.fixture
async def smtpd_implicit_tls_server(
    request: pytest.FixtureRequest,
    smtp_server_tls_context: ssl.SSLContext,
    smtp_client_tls_context: ssl.SSLContext,
) -> AsyncIterator[SMTPTestServer]:
    """TLS from the first byte (SMTPS); AUTH offered (not required) as ``.username``."""
    server = SMTPTestServer(
        implicit_tls_context=smtp_server_tls_context,
        auth=("prospect", "correct horse battery staple"),
        client_tls_context=smtp_client_tls_context,
    )
    async with _serving(server, request) as running:
        yield running
