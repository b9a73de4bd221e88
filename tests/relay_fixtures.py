"""Pytest plugin: the SMTP relay on 127.0.0.1, a real store and a real aiosmtpd sink upstream.

``relay_env`` starts a :class:`~prospect_mailer.relay.RelayServer` in the test's loop on an
ephemeral port, in front of the ``smtpd_server`` sink, on the ``db_url`` store (SQLite, and
PostgreSQL when configured), with campaign ``spring`` registered and these prospects:

* ``MARIE`` and ``PAUL``: professionals whose job matches the campaign (allowed);
* ``SUPPRESSED``: allowed by the rules but on the suppression list (SUPP_CHECK_AT_SEND);
* ``PRIVATE``: a private individual without consent (FR_B2C_CONSENT_REQUIRED);
* ``UNKNOWN`` is not registered.

``make_relay_env(**relay_settings)`` builds another one with other settings. Clients:
:func:`smtp_exchange` runs Python's blocking ``smtplib`` in a worker thread and returns every
reply; :func:`raw_exchange` writes raw bytes (for smuggling payloads smtplib would not send).
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from factories import CAMPAIGN as FACTORY_CAMPAIGN
from factories import b2b
from smtp_fixtures import SMTPTestServer

from prospect_mailer.mailer import ProspectMailer
from prospect_mailer.models import Prospect
from prospect_mailer.relay import RelayServer
from prospect_mailer.relay_config import RelaySettings
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import SMTPTransport, Transport

KEY = "relay-test-signing-key-0123456789"
BASE = "https://optout.acme.example"
MAILTO_DOMAIN = "optout.acme.example"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MARIE, PAUL = "marie.curie@radium.example", "paul.langevin@radium.example"
SUPPRESSED, PRIVATE = "pierre.curie@radium.example", "irene@gmail.example"
UNKNOWN = "nobody@radium.example"
SENDER = "ventes@acme.example"

#: The relay sends the client's message, not templates.
CAMPAIGN = FACTORY_CAMPAIGN.model_copy(
    update={"text_template": "{# relay #}", "html_template": None}
)

#: A prospect every rule allows for ``CAMPAIGN``.
professional = b2b


@dataclass
class RelayEnv:
    """A running relay, its store and mailer, and the upstream sink."""

    relay: RelayServer
    store: Store
    mailer: ProspectMailer
    sink: SMTPTestServer
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        """The relay's port on 127.0.0.1."""
        return self.relay.port

    def received_by(self, rcpt: str) -> list[bytes]:
        """Raw messages the sink received for ``rcpt``."""
        return [m.data for m in self.sink.messages if rcpt in m.rcpt_tos]

    async def delivered_to(self, rcpt: str, seconds: float = 5.0) -> list[bytes]:
        """:meth:`received_by`, once the sink has something for ``rcpt`` (or ``seconds``
        have passed): for a delivery that goes on after its client left."""
        for _ in range(int(seconds / 0.05)):
            if self.received_by(rcpt):
                break
            await asyncio.sleep(0.05)
        return self.received_by(rcpt)


MakeRelayEnv = Callable[..., Awaitable[RelayEnv]]


@pytest.fixture
async def make_relay_env(db_url: str, smtpd_server: SMTPTestServer) -> AsyncIterator[MakeRelayEnv]:
    """Build relays in front of ``smtpd_server``; keyword arguments are RelaySettings fields."""
    opened: list[tuple[RelayServer, ProspectMailer, Transport]] = []
    store = await Store.open(db_url)
    await store.campaigns.upsert(CAMPAIGN)
    await store.prospects.upsert_many(
        [
            professional(MARIE),
            professional(PAUL, name="Paul Langevin"),
            professional(SUPPRESSED, name="Pierre Curie"),
            Prospect(email=PRIVATE, recipient_type="individual", source_type="direct"),
        ]
    )
    await store.suppression.add_address(
        SUPPRESSED, scope_value="acme", reason="unsubscribe", source="test"
    )

    async def make(
        *,
        transport: Transport | None = None,
        server_kwargs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> RelayEnv:
        settings: dict[str, Any] = dict(
            listen="127.0.0.1:0",
            hostname="relay.test",
            allowed_networks=["127.0.0.1/32"],
            shutdown_grace=5.0,
        )
        settings.update(kw)
        upstream = transport or SMTPTransport(smtpd_server.host, smtpd_server.port, timeout=5)
        mailer = ProspectMailer(
            store=store,
            transport=upstream,
            signer=TokenSigner([KEY]),
            base_url=BASE,
            mailto_domain=MAILTO_DOMAIN,
            clock=lambda: NOW,
            transport_label="relay",
        )
        relay = RelayServer(mailer, RelaySettings(**settings), **(server_kwargs or {}))
        await relay.start()
        opened.append((relay, mailer, upstream))
        return RelayEnv(relay=relay, store=store, mailer=mailer, sink=smtpd_server)

    yield make
    for relay, mailer, upstream in opened:
        await relay.close()
        await mailer.close()
        await upstream.close()
    await store.close()


@pytest.fixture
async def relay_env(make_relay_env: MakeRelayEnv) -> RelayEnv:
    """A relay with the default test settings (clients from 127.0.0.1 may relay)."""
    return await make_relay_env()


@dataclass
class Exchange:
    """Every reply of one SMTP session: ``rcpt`` maps each recipient to ``(code, text)``."""

    mail: tuple[int, str] = (0, "")
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None
    ehlo: str = ""


def _session(
    port: int,
    sender: str,
    rcpts: list[str],
    data: bytes | None,
    source: str | None,
    tls: ssl.SSLContext | None,
    login: tuple[str, str] | None,
) -> Exchange:
    out = Exchange()
    client = smtplib.SMTP(
        "127.0.0.1", port, timeout=10, source_address=(source, 0) if source else None
    )
    try:
        client.ehlo("client.test")
        if tls is not None:
            client.starttls(context=tls)
            client.ehlo("client.test")
        out.ehlo = str(client.ehlo_resp or b"", "ascii", "replace")
        if login is not None:
            client.login(*login)
        code, text = client.mail(sender)
        out.mail = (code, text.decode())
        for r in rcpts:
            code, text = client.rcpt(r)
            out.rcpt[r] = (code, text.decode())
        if data is not None and any(c == 250 for c, _ in out.rcpt.values()):
            try:
                code, text = client.data(data)
            except smtplib.SMTPDataError as exc:
                code, text = exc.smtp_code, exc.smtp_error
            out.data = (code, text.decode())
        client.quit()
    finally:
        client.close()
    return out


async def smtp_exchange(
    port: int,
    rcpts: list[str],
    data: bytes | None,
    *,
    sender: str = SENDER,
    source: str | None = None,
    tls: ssl.SSLContext | None = None,
    login: tuple[str, str] | None = None,
) -> Exchange:
    """One SMTP session with Python's smtplib (blocking, so in a worker thread)."""
    return await asyncio.to_thread(_session, port, sender, rcpts, data, source, tls, login)


async def raw_exchange(port: int, lines: list[bytes], *, wait_for: int) -> list[str]:
    """Send raw bytes line by line; return the server's replies (until ``wait_for`` of them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[str] = []
    try:
        replies.append((await reader.readline()).decode())
        for line in lines:
            writer.write(line)
            await writer.drain()
        while len(replies) < wait_for:
            got = await asyncio.wait_for(reader.readline(), 10)
            if not got:
                break
            replies.append(got.decode())
    finally:
        await close_client(writer)
    return replies


async def close_client(writer: asyncio.StreamWriter) -> None:
    """Close a test client's connection. The relay may have closed it first (after a 421)
    and the kernel may answer the client's last bytes with a reset: that is not an error of
    the test."""
    writer.close()
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        await writer.wait_closed()


def relay_message(
    *to: str, campaign: str | None = "spring", message_id: str | None = "<m1@crm.example>"
) -> EmailMessage:
    """A CRM-style message: text + HTML + a PDF attachment, with relay metadata headers."""
    msg = EmailMessage()
    msg["From"] = f"ACME Ventes <{SENDER}>"
    msg["To"] = ", ".join(to)
    msg["Subject"] = "Capteurs connectés pour vos entrepôts"
    if message_id:
        msg["Message-ID"] = message_id
    if campaign:
        msg["X-Prospect-Campaign"] = campaign
    msg["X-Prospect-Crm-Id"] = "opportunity-4411"
    msg["X-Mailer"] = "ExampleCRM 7.2"
    msg.set_content("Bonjour,\nnos capteurs mesurent tout.\n")
    msg.add_alternative("<html><body><p>Bonjour, nos capteurs.</p></body></html>", subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="offre.pdf")
    return msg


def wire(msg: EmailMessage) -> bytes:
    """``msg`` as a client sends it: CRLF line endings."""
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


#: An attachment that must arrive byte-identical (binary, all 256 byte values).
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
