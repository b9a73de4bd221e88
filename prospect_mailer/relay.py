"""The drop-in SMTP relay: existing tools send through prospect-mailer unchanged.

An aiosmtpd :class:`~aiosmtpd.smtp.SMTP` server (never its blocking ``Proxy`` handler) in front of
the one pipeline. Hooks are in :mod:`prospect_mailer.relay_handler`, reply codes in
:mod:`prospect_mailer.relay_replies`, DSNs in :mod:`prospect_mailer.relay_dsn`, DKIM in
:mod:`prospect_mailer.relay_dkim`, settings in :mod:`prospect_mailer.relay_config`.

Never an open relay: a client may relay only from ``allowed_networks`` (default: loopback) or
after AUTH, which is offered only over TLS. Opt-out and bounce addresses
(``unsubscribe+TOKEN@``, ``bounce+TOKEN@``) are accepted from anyone: objections must get in.

::

    async with await RelayServer.from_settings(load_settings()) as relay:
        await relay.serve_until(stop_event)
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import importlib
import ipaddress
import logging
import re
import socket
import ssl
from base64 import b64decode
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from aiosmtpd.smtp import MISSING
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from .addresses import RoleClassifier
from .campaigns import load_campaign_dir, register_campaigns
from .compliance import FooterRenderer
from .config import PLACEHOLDER_BASE_URL, Settings
from .errors import ConfigError
from .mailer import ProspectMailer
from .relay_config import RelaySettings, parse_listen
from .relay_data import read_data
from .relay_dkim import DKIMSigner, DKIMTransport
from .relay_handler import InboundHandler, RelayEnvelope, RelayHandler, aiosmtpd_names
from .relay_replies import REPLY_SHUTDOWN
from .store import Store
from .tokens import TokenSigner
from .transport import OutboxTransport, SMTPTransport, Transport

__all__ = ["RelayServer", "RelaySession", "default_inbound_handler"]

log = logging.getLogger("prospect_mailer.relay")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

# Commands a client may still send while the relay shuts down, to finish the transaction it
# started; anything else gets 421 4.3.2 and the connection is closed.
_FINISHING = frozenset({"RCPT", "DATA", "NOOP", "QUIT"})


def default_inbound_handler() -> InboundHandler | None:
    """``prospect_mailer.inbound.handle_inbound`` when that module is installed, else ``None``."""
    try:
        module = importlib.import_module("prospect_mailer.inbound")
    except ModuleNotFoundError as exc:
        if exc.name != "prospect_mailer.inbound":
            raise
        return None
    return cast(InboundHandler, module.handle_inbound)


# <dot-atom@dot-atom-domain>, then optional spaces (which the RFC 5322 parser consumes as CFWS)
# when parameters or nothing follow. A comment "(" after it is left to the full parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR = re.compile(
    rf"[ \t]*<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>[ \t]*(?=[^ \t(]|$)"
)


class _NotCancelled:
    """Stands in for a session's task while aiosmtpd's connection_lost or eof_received run
    during a delivery (see :meth:`RelaySession.connection_lost`)."""

    def cancel(self, msg: object = None) -> bool:
        return False


_NOT_CANCELLED = _NotCancelled()


class RelaySession(AiosmtpdSMTP):
    """One client connection: aiosmtpd's protocol plus admission, shutdown and timeouts."""

    def __init__(self, relay: RelayServer, **kwargs: Any) -> None:
        super().__init__(relay.handler, **kwargs)
        self.relay = relay
        self.client_ip: _IP | None = None
        self.client_key = ""  # what max_connections_per_client counts this connection under
        self.from_allowed_network = False
        self.refused = False
        self.busy = False  # inside handle_DATA: delivering upstream
        # The client closed (``gone``) or half-closed (``ended``) while a delivery ran: it
        # runs to its end all the same (see connection_lost), then the session ends.
        self.gone = False
        self.ended = False
        self._deadline = 0.0  # of the inactivity timer (loop time)
        self._held: list[bytes] = []  # the lines so far of a multi-line reply (see push)

    def __dir__(self) -> list[str]:
        """Only the command, AUTH and hook methods (see :func:`aiosmtpd_names`)."""
        return aiosmtpd_names(type(self))

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's ``push``, except that the lines of a multi-line reply (``250-...``) are
        held until its last one (``250 ...``) and written with it: EHLO's lines leave in one
        write, one segment, where aiosmtpd writes and drains each of them (six system calls
        and as many segments the client reads, on every new session)."""
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if status[3:4] == b"-":
            self._held.append(status)
            return
        if self._held:
            status = b"\r\n".join([*self._held, status])
            self._held.clear()
        self._writer.write(status + b"\r\n")
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parsing, with a fast path for a plain ``<local@domain>``.

        aiosmtpd runs the email package's RFC 5322 parser on every MAIL FROM and RCPT TO (and
        builds a class each time): ~100 µs, a tenth of a relayed message's CPU. A dot-atom
        local part at a plain domain, followed by nothing, spaces or parameters, parses to
        itself; anything else (quotes, comments, literals, non-ASCII) takes aiosmtpd's path.
        """
        match = _PLAIN_ANGLE_ADDR.match(arg) if arg else None
        if match is None:
            return super()._getaddr(arg)
        address = match.group(1)
        local = address.rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return address, arg[match.end() :]

    @property
    def authenticated_user(self) -> str | None:
        """The AUTH user of this connection, if it authenticated."""
        data = self.session.auth_data if self.session and self.session.authenticated else None
        return data if isinstance(data, str) else None

    @property
    def permitted(self) -> bool:
        """May this client relay to prospects (allowed network or authenticated)?"""
        return self.from_allowed_network or self.authenticated_user is not None

    @property
    def in_transaction(self) -> bool:
        """Between MAIL FROM and the reply to DATA."""
        return self.busy or (self.envelope is not None and self.envelope.mail_from is not None)

    def rearm_timeout(self, seconds: float) -> None:
        """Restart the inactivity timer with ``seconds`` (aiosmtpd has one timer, for all)."""
        self._reset_timeout(seconds)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's inactivity timer, moved without a new loop timer per command.

        aiosmtpd cancels its timer and schedules a new one at every command (five or more per
        message, each a timer object and a heap entry). Here the deadline is a number; the
        one armed timer, when it fires early, re-arms itself at the deadline. A deadline
        earlier than the armed timer (a shorter duration) re-arms it at once.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        if self.loop.time() >= self._deadline:
            self._timeout_cb()  # type: ignore[no-untyped-call]
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_deadline)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and not self.refused:  # not the second call after STARTTLS
            peer = transport.get_extra_info("peername")
            refusal = self.relay.admit(self, peer[0] if peer else "")
            if refusal:
                self.refused = True
                cast(asyncio.WriteTransport, transport).write(refusal.encode() + b"\r\n")
                transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """aiosmtpd's, except during a delivery: aiosmtpd cancels the session's task when
        the connection goes, which would cut the delivery half-way: a claim made and nothing
        sent upstream (or the upstream's transaction dropped before its reply), which the
        client's retry of the message would then be told was delivered (250, "by an earlier
        attempt"). The delivery runs to its end instead, recorded as it ends, and the session
        is let go of after it (:meth:`data_command`); a relay stopping waits for it."""
        if self.refused:
            return  # aiosmtpd never started on this connection
        if self.busy:
            self.gone = True
            self._not_cancelling(super().connection_lost, error)
            return
        self.relay.release(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """aiosmtpd's (it cancels the session's task at EOF), except during a delivery,
        which runs to its end: a client that half-closed after its final dot still gets
        the reply, then the session ends (see :meth:`connection_lost`)."""
        if self.busy:
            self.ended = True
            return self._not_cancelling(super().eof_received)
        return super().eof_received()

    def _not_cancelling(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` with aiosmtpd's cancelling of the session's task left out."""
        task, self._handler_coroutine = self._handler_coroutine, _NOT_CANCELLED  # type: ignore[assignment]
        try:
            return call(*args)
        finally:
            self._handler_coroutine = task

    def close_with(self, reply: str) -> None:
        """Send one last reply and close (unsolicited 421 is allowed: RFC 5321 3.8)."""
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    async def data_command(self, arg: str | None) -> None:
        """aiosmtpd's ``smtp_DATA`` with the content read in blocks (:mod:`relay_data`): the
        same checks, replies and handler call; about 3 µs less per line of the message."""
        if self._decode_data:  # the relay never decodes; keep aiosmtpd's path if one does
            await AiosmtpdSMTP.smtp_DATA(self, arg)
            return
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await read_data(
            self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
        )
        if content is None:  # the client went away
            return
        if isinstance(content, str):
            await self.push(content)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = content
        try:
            status = await self._call_handler_hook("DATA")
        except Exception as exc:
            if not (self.gone or self.ended):
                raise  # aiosmtpd answers it (handle_exception) and reads the next command
            status = await self.handle_exception(exc)  # logged; answered below if still there
        finally:
            if self.gone:  # the client went away during the delivery: nobody to answer
                self.relay.release(self)
        if self.gone:
            return  # aiosmtpd's loop ends: the connection is gone (self.transport is None)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
        if self.ended:
            # Half-closed during the delivery, now answered: the session ends as aiosmtpd ends
            # one at EOF, its task cancelled (aiosmtpd then closes the connection).
            raise asyncio.CancelledError

    async def read_auth_response(self, initial: str | None, challenge: str) -> bytes | None:
        """The decoded AUTH response (initial argument or answer to ``challenge``).

        Returns ``None`` after replying with the error (bad base64, ``*`` abort).
        """
        if initial is None:
            answer = await self.challenge_auth(challenge)
            return answer if isinstance(answer, bytes) else None  # MISSING: already answered
        try:
            return b64decode(initial.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Can't decode base64")
            return None


def _guarded(verb: str) -> Callable[[RelaySession, str | None], Coroutine[Any, Any, None]]:
    original = getattr(AiosmtpdSMTP, f"smtp_{verb}")
    command = RelaySession.data_command if verb == "DATA" else original

    @functools.wraps(original)  # keeps aiosmtpd's @syntax attributes, which HELP reads
    async def method(self: RelaySession, arg: str | None) -> None:
        if self.relay.closing and not (verb in _FINISHING and self.in_transaction):
            self.close_with(REPLY_SHUTDOWN)
            return
        if verb == "DATA":
            self.rearm_timeout(self.relay.settings.data_timeout)
        await command(self, arg)

    return method


for _verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "AUTH", "STARTTLS"):
    setattr(RelaySession, f"smtp_{_verb}", _guarded(_verb))


class RelayServer:
    """The relay: listens, admits clients, and shuts down gracefully.

    Args:
        mailer: the pipeline (create it with ``transport_label="relay"``).
        settings: relay settings.
        inbound: opt-out/bounce handler (default: :func:`default_inbound_handler`).
        tls_context: server TLS context (default: from ``tls_cert``/``tls_key``); STARTTLS,
            or TLS from the first byte with ``settings.implicit_tls``.
        dsn_transport: where DSNs go (default: the mailer's transport).
        owns_mailer: close the mailer (store, transport) in :meth:`close`.
    """

    def __init__(
        self,
        mailer: ProspectMailer,
        settings: RelaySettings,
        *,
        inbound: InboundHandler | None = None,
        tls_context: ssl.SSLContext | None = None,
        dsn_transport: Transport | None = None,
        owns_mailer: bool = False,
    ) -> None:
        self.mailer = mailer
        self.settings = settings
        self.host, self.port = parse_listen(settings.listen)
        self.tls_context = tls_context or _tls_context(settings)
        if settings.implicit_tls and self.tls_context is None:
            raise ConfigError("relay.implicit_tls needs relay.tls_cert and relay.tls_key")
        self.handler = RelayHandler(
            mailer=mailer,
            settings=settings,
            inbound=inbound if inbound is not None else default_inbound_handler(),
            dsn_transport=dsn_transport or mailer.transport,
        )
        self.closing = False
        self._networks = settings.networks()
        self._sessions: set[RelaySession] = set()
        self._per_ip: Counter[str] = Counter()
        self._peers: dict[str, tuple[_IP | None, str, bool]] = {}
        self._server: asyncio.Server | None = None
        self._owns = owns_mailer

    @classmethod
    async def from_settings(cls, settings: Settings) -> RelayServer:
        """Open the store and upstream from ``settings``; register ``campaigns_dir``.

        Upstream: ``relay.upstream``, else the core ``smtp_url``, else the outbox folder.

        Raises:
            ConfigError: bad settings (placeholder base URL with a real upstream, TLS files).
            StoreError: the database cannot be opened.
            DataFileError: a campaign file of ``campaigns_dir`` is invalid.
        """
        r = settings.relay
        secret = r.upstream or settings.smtp_url
        url = secret.get_secret_value() if secret else None
        if url and settings.base_url == PLACEHOLDER_BASE_URL:
            raise ConfigError(
                "PROSPECT_MAILER_BASE_URL is not set: relayed mail needs a working unsubscribe "
                "link (FR_OPTOUT_EVERY_MESSAGE)"
            )
        upstream: Transport = (
            SMTPTransport.from_url(url, timeout=settings.smtp_timeout, local_hostname=r.hostname)
            if url
            else OutboxTransport(settings.outbox_dir)
        )
        transport: Transport = upstream
        if r.dkim_key or r.dkim_selector or r.dkim_domain:
            if not (r.dkim_key and r.dkim_selector and r.dkim_domain):
                raise ConfigError("relay DKIM needs dkim_key, dkim_selector and dkim_domain")
            signer = DKIMSigner.from_files(
                r.dkim_key, selector=r.dkim_selector, domain=r.dkim_domain
            )
            transport = DKIMTransport(upstream, signer)
        tls = _tls_context(r)
        signing = TokenSigner(settings.signing_keys())
        campaigns = (
            await asyncio.to_thread(load_campaign_dir, r.campaigns_dir) if r.campaigns_dir else []
        )
        store = await Store.open(settings.database_url, writer_process=r.writer_process)
        try:
            await register_campaigns(store, campaigns)
        except BaseException:
            await store.close()
            raise
        mailer = ProspectMailer(
            store=store,
            transport=transport,
            signer=signing,
            base_url=settings.base_url,
            mailto_domain=settings.unsubscribe_mailto_domain,
            bounce_domain=settings.bounce_domain,
            renderer=FooterRenderer(settings.template_dirs),
            classifier=RoleClassifier(extra_names=frozenset(settings.role_names)),
            concurrency=settings.concurrency,
            transport_label="relay",
            owns_resources=True,
        )
        return cls(mailer, r, tls_context=tls, dsn_transport=upstream, owns_mailer=True)

    # -- admission ------------------------------------------------------------------------------

    def admit(self, session: RelaySession, peer_host: str) -> str | None:
        """Register a new connection; return a 421 reply to refuse it instead."""
        if self.closing:
            return REPLY_SHUTDOWN
        ip, key, allowed = self._peer(peer_host)
        if self._per_ip[key] >= self.settings.max_connections_per_client:
            log.warning("relay: refused a connection from %s (too many at once)", key)
            return "421 4.7.0 Too many connections from your address, try again later"
        self._per_ip[key] += 1
        session.client_ip, session.client_key = ip, key
        session.from_allowed_network = allowed
        self._sessions.add(session)
        return None

    def _peer(self, peer_host: str) -> tuple[_IP | None, str, bool]:
        """The client's address, its key for the per-client count, and whether it is on an
        allowed network; kept per peer string (a CRM connects again and again from one)."""
        known = self._peers.get(peer_host)
        if known is not None:
            return known
        try:
            ip: _IP | None = ipaddress.ip_address(peer_host.split("%", 1)[0])
        except ValueError:
            ip = None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        allowed = ip is not None and any(ip in n for n in self._networks)
        if len(self._peers) >= 4096:
            self._peers.clear()
        known = self._peers[peer_host] = (ip, str(ip or peer_host), allowed)
        return known

    def release(self, session: RelaySession) -> None:
        """Forget a closed connection."""
        if session in self._sessions:
            self._sessions.discard(session)
            key = session.client_key  # not str(client_ip): "None" for a peer that is no IP
            self._per_ip[key] -= 1
            if self._per_ip[key] <= 0:
                del self._per_ip[key]

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._sessions)

    # -- life cycle -----------------------------------------------------------------------------

    def _make_session(self) -> RelaySession:
        s = self.settings
        return RelaySession(
            self,
            hostname=s.hostname,  # else aiosmtpd calls the blocking socket.getfqdn()
            ident="prospect-mailer relay",
            loop=asyncio.get_running_loop(),
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            tls_context=None if s.implicit_tls else self.tls_context,
            # AUTH only over TLS. aiosmtpd does not count implicit TLS as TLS, so on an
            # implicit-TLS listener (where every byte is encrypted) it need not require it.
            auth_require_tls=not s.implicit_tls,
            timeout=s.command_timeout,
            command_call_limit={"AUTH": 5, "*": 1_000_000},  # slow down password guessing
        )

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``settings.listen`` (port 0: pick one; see :attr:`port`), or accept on
        ``sock``, a listening socket shared with other relay processes (``workers``)."""
        loop = asyncio.get_running_loop()
        ssl_context = self.tls_context if self.settings.implicit_tls else None
        if sock is not None:
            self._server = await loop.create_server(self._make_session, sock=sock, ssl=ssl_context)
        else:
            self._server = await loop.create_server(
                self._make_session,
                host=self.host,
                port=self.port,
                ssl=ssl_context,
                reuse_address=True,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
            )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("relay listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight transactions finish (``shutdown_grace``), then close.

        Idle clients get ``421 4.3.2`` at once; a client in a transaction may finish it (its
        reply to DATA is sent), then gets 421 at its next command. Past the grace, the
        clients still in a transaction get 421 (they retry), and a delivery already under
        way still runs to its end before this returns (never cut half-way: see
        :meth:`RelaySession.connection_lost`).
        """
        self.closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace
        while True:
            for session in list(self._sessions):
                if not session.in_transaction:
                    session.close_with(REPLY_SHUTDOWN)
            if not self._sessions or loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for session in list(self._sessions):  # out of time: the client will retry
            session.close_with(REPLY_SHUTDOWN)
        # Let connection_lost run, so that no socket outlives the server. A delivery under way
        # runs to its end (see RelaySession.connection_lost), bounded by the upstream's and
        # the store's timeouts, and by data_timeout here.
        if not await self._sessions_ended(1.0):
            log.warning("relay: waiting for %d deliveries under way", len(self._sessions))
            await self._sessions_ended(self.settings.data_timeout)
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _sessions_ended(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for every session to be let go of; whether they were."""
        for _ in range(int(seconds / 0.01)):
            if not self._sessions:
                return True
            await asyncio.sleep(0.01)
        return not self._sessions

    async def close(self) -> None:
        """:meth:`stop`, then close the mailer (store and upstream) if this relay owns it."""
        try:
            await self.stop()
        finally:
            if self._owns:
                await self.mailer.close()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (e.g. by a SIGTERM handler), then :meth:`close`."""
        if self._server is None:
            await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _tls_context(settings: RelaySettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("relay TLS needs both tls_cert and tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"relay TLS: cannot load {settings.tls_cert}: {exc}") from exc
    return context
