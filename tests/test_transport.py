"""Transports against a real aiosmtpd server on 127.0.0.1 (see smtp_fixtures), a real folder,
and memory. Faults are injected into the server, never by mocking the client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email
import email.policy
import re
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import quote

import aiosmtplib
import aiosmtplib.email
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from smtp_fixtures import SMTPTestServer

from prospect_mailer.errors import (
    ConfigError,
    TransportError,
    TransportPermanentError,
    TransportTemporaryError,
)
from prospect_mailer.transport import (
    PLAIN_ADDRESS,
    Delivery,
    MemoryTransport,
    OutboxTransport,
    SMTPTransport,
    Transport,
    transport_from_settings,
)

MakeSMTP = Callable[..., SMTPTransport]

SENDER = "ventes@exemple.fr"
TO = "prospect@client.example"


def make_message(n: int = 1, *, to: str = TO) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Ventes <{SENDER}>"
    message["To"] = to
    message["Subject"] = f"Proposition n°{n}"  # non-ASCII: encoded header must pass untouched
    message["Message-ID"] = f"<msg-{n}@exemple.fr>"
    message["Date"] = "Mon, 02 Dec 2024 10:00:00 +0100"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    message.set_content(f"Bonjour,\n.une ligne qui commence par un point\nmessage {n}\n")
    return message


def wire_bytes(message: EmailMessage) -> bytes:
    return message.as_bytes(policy=email.policy.SMTP)


@pytest_asyncio.fixture
async def make_smtp() -> AsyncIterator[MakeSMTP]:
    """Build SMTP transports bound to a test server; all are closed after the test."""
    made: list[SMTPTransport] = []

    def make(server: SMTPTestServer, **options: object) -> SMTPTransport:
        options.setdefault("timeout", 5)
        options.setdefault("local_hostname", "client.test")
        transport = SMTPTransport(server.host, server.port, **options)  # type: ignore[arg-type]
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


@pytest.fixture(params=[True, False], ids=["pipelined", "one-by-one"])
def pipelined(request: pytest.FixtureRequest, smtpd_server: SMTPTestServer) -> bool:
    """Run the test with a server that offers PIPELINING (the client writes MAIL, RCPT and DATA
    at once) and with one that does not (aiosmtplib's command-by-command path)."""
    smtpd_server.pipelining = request.param
    return bool(request.param)


# --- SMTP: delivery --------------------------------------------------------------------------


async def test_message_arrives_with_envelope_and_bytes_unchanged(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    transport = make_smtp(smtpd_server)
    message = make_message()

    delivery = await transport.send(message, sender=SENDER, recipients=[TO])

    assert delivery.code == 250
    assert delivery.reply == "2.0.0 OK queued as test-1"
    assert delivery.transport == "smtp"
    assert delivery.refused == {}
    assert smtpd_server.messages == [(SENDER, [TO], wire_bytes(message))]
    data = smtpd_server.messages[0].data
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only, as on the wire
    received = email.message_from_bytes(data, policy=email.policy.default)
    assert received["Subject"] == "Proposition n°1"
    assert received["Message-ID"] == "<msg-1@exemple.fr>"
    assert ".une ligne" in received.get_content()  # dot-stuffing undone by the server


async def test_envelope_is_used_not_headers(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server)
    message = make_message()
    message["Bcc"] = "hidden@client.example"

    await transport.send(message, sender="bounces@exemple.fr", recipients=["other@client.example"])

    mail_from, rcpt_tos, data = smtpd_server.messages[0]
    assert (mail_from, rcpt_tos) == ("bounces@exemple.fr", ["other@client.example"])
    assert b"hidden@client.example" not in data  # Bcc is never transmitted


async def test_one_connection_is_reused_for_a_batch(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server)

    for n in range(5):
        await transport.send(make_message(n), sender=SENDER, recipients=[TO])

    assert len(smtpd_server.messages) == 5
    assert smtpd_server.connections == 1
    assert len(smtpd_server.commands_named("EHLO")) == 1


async def test_pool_bounds_concurrent_connections(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server, pool_size=3)
    smtpd_server.data_delay = 0.05  # keep sends overlapping

    deliveries = await asyncio.gather(
        *(transport.send(make_message(n), sender=SENDER, recipients=[TO]) for n in range(10))
    )

    assert all(d.code == 250 for d in deliveries)
    assert len(smtpd_server.messages) == 10
    assert 1 < smtpd_server.connections <= 3


async def test_close_quits_pooled_connections_and_transport_stays_usable(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])

    await transport.close()
    await asyncio.sleep(0.05)

    assert len(smtpd_server.commands_named("QUIT")) == 1
    assert smtpd_server.connections == 1
    await transport.send(make_message(2), sender=SENDER, recipients=[TO])
    assert smtpd_server.connections == 2


async def test_connection_idle_past_max_idle_is_checked_with_noop(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server, max_idle=0.1)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])
    await transport.send(make_message(2), sender=SENDER, recipients=[TO])
    assert smtpd_server.commands_named("NOOP") == []  # recently used: trusted as is

    await asyncio.sleep(0.2)
    await transport.send(make_message(3), sender=SENDER, recipients=[TO])

    assert smtpd_server.commands_named("NOOP") == [None]
    assert smtpd_server.connections == 1
    assert len(smtpd_server.messages) == 3


async def test_connection_in_use_during_close_is_not_pooled_again(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server)
    smtpd_server.data_delay = 0.2
    sending = asyncio.create_task(transport.send(make_message(), sender=SENDER, recipients=[TO]))
    await asyncio.sleep(0.05)

    await transport.close()
    assert (await sending).code == 250
    await asyncio.sleep(0.05)

    assert smtpd_server.open_connections == 0


async def test_async_context_manager_closes(smtpd_server: SMTPTestServer) -> None:
    async with SMTPTransport(smtpd_server.host, smtpd_server.port, timeout=5) as transport:
        await transport.send(make_message(), sender=SENDER, recipients=[TO])
    await asyncio.sleep(0.05)
    assert smtpd_server.commands_named("QUIT") == [None]


# --- SMTP: connections that die ----------------------------------------------------------------


async def test_connection_closed_by_server_while_idle_is_replaced(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    smtpd_server.idle_timeout = 0.3
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])

    await asyncio.sleep(0.6)  # the server hangs up on the idle pooled connection
    await transport.send(make_message(2), sender=SENDER, recipients=[TO])

    assert [m.data for m in smtpd_server.messages] == [
        wire_bytes(make_message(1)),
        wire_bytes(make_message(2)),
    ]
    assert smtpd_server.connections == 2


async def test_dead_pooled_connection_is_retried_once_without_duplicate(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])
    # The pooled connection still looks alive to the client, but the server drops it at the
    # first command: the race a pool meets when a server times out an idle client.
    smtpd_server.drop_on_mail = 1

    delivery = await transport.send(make_message(2), sender=SENDER, recipients=[TO])

    assert delivery.code == 250
    assert len(smtpd_server.messages) == 2  # message 2 exactly once
    assert len(smtpd_server.commands_named("MAIL")) == 3  # dropped, then retried once
    assert smtpd_server.connections == 2


async def test_connections_dropped_by_server_are_replaced(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])

    await smtpd_server.drop_connections()  # e.g. a server restart between two messages
    await transport.send(make_message(2), sender=SENDER, recipients=[TO])

    assert len(smtpd_server.messages) == 2
    assert smtpd_server.connections == 2
    assert smtpd_server.open_connections == 1


async def test_no_retry_once_data_was_sent(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])
    smtpd_server.disconnect_on_data = True  # accepted or not? the client cannot know

    with pytest.raises(TransportTemporaryError) as caught:
        await transport.send(make_message(2), sender=SENDER, recipients=[TO])

    assert caught.value.code is None
    assert len(smtpd_server.commands_named("DATA")) == 2  # no second attempt at message 2
    assert smtpd_server.connections == 1


@pytest.mark.smtp_fault("disconnect_on_data")
async def test_disconnect_on_data_on_a_fresh_connection(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    with pytest.raises(TransportTemporaryError):
        await make_smtp(smtpd_server).send(make_message(), sender=SENDER, recipients=[TO])
    assert smtpd_server.messages == []


async def test_server_down_then_back(smtpd_server: SMTPTestServer, make_smtp: MakeSMTP) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(1), sender=SENDER, recipients=[TO])

    await smtpd_server.stop()
    with pytest.raises(TransportTemporaryError) as caught:
        await transport.send(make_message(2), sender=SENDER, recipients=[TO])
    assert caught.value.code is None
    assert f"{smtpd_server.host}:{smtpd_server.port}" in str(caught.value)

    await smtpd_server.start()
    await transport.send(make_message(3), sender=SENDER, recipients=[TO])
    assert [m.data for m in smtpd_server.messages] == [
        wire_bytes(make_message(1)),
        wire_bytes(make_message(3)),
    ]


async def test_server_that_stops_accepting_mid_batch(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    smtpd_server.fail_after_n_messages = 2
    transport = make_smtp(smtpd_server)
    for n in range(2):
        await transport.send(make_message(n), sender=SENDER, recipients=[TO])

    with pytest.raises(TransportTemporaryError) as caught:
        await transport.send(make_message(3), sender=SENDER, recipients=[TO])

    assert caught.value.code == 421
    assert len(smtpd_server.messages) == 2


async def test_connection_refused_is_temporary(
    make_smtp: MakeSMTP, smtpd_server: SMTPTestServer
) -> None:
    await smtpd_server.stop()
    with pytest.raises(TransportTemporaryError) as caught:
        await make_smtp(smtpd_server).send(make_message(), sender=SENDER, recipients=[TO])
    assert caught.value.code is None
    assert isinstance(caught.value, ConnectionError)  # our errors also subclass the builtin


@pytest.mark.smtp_fault("slow_data")
async def test_timeout_is_temporary_and_fast(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    transport = make_smtp(smtpd_server, timeout=0.5)
    started = time.monotonic()

    with pytest.raises(TransportTemporaryError) as caught:
        await transport.send(make_message(), sender=SENDER, recipients=[TO])

    assert time.monotonic() - started < 2
    assert caught.value.code is None
    assert "timed out" in str(caught.value)


# --- SMTP: replies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        pytest.param(TransportTemporaryError, 451, marks=pytest.mark.smtp_fault("mail_4xx")),
        pytest.param(TransportPermanentError, 553, marks=pytest.mark.smtp_fault("mail_5xx")),
        pytest.param(TransportTemporaryError, 450, marks=pytest.mark.smtp_fault("rcpt_4xx")),
        pytest.param(TransportPermanentError, 550, marks=pytest.mark.smtp_fault("rcpt_5xx")),
        pytest.param(TransportTemporaryError, 451, marks=pytest.mark.smtp_fault("data_4xx")),
        pytest.param(TransportPermanentError, 554, marks=pytest.mark.smtp_fault("data_5xx")),
    ],
)
async def test_refusals_map_to_temporary_or_permanent(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    error: type[TransportError],
    code: int,
    pipelined: bool,
) -> None:
    transport = make_smtp(smtpd_server)

    with pytest.raises(error) as caught:
        await transport.send(make_message(), sender=SENDER, recipients=[TO])

    assert type(caught.value) is error
    assert caught.value.code == code
    assert caught.value.reply.startswith(str(code)[0])  # the server's text, e.g. "5.1.1 ..."
    assert smtpd_server.messages == []
    # after an error the connection is dropped, never reused
    smtpd_server.fail_mail = smtpd_server.rcpt_reply = smtpd_server.data_reply = None
    await transport.send(make_message(), sender=SENDER, recipients=[TO])
    assert smtpd_server.connections == 2


@pytest.mark.smtp_fault("data_4xx", reply="452 4.3.1 insufficient system storage")
async def test_marker_reply_override(smtpd_server: SMTPTestServer, make_smtp: MakeSMTP) -> None:
    with pytest.raises(TransportTemporaryError) as caught:
        await make_smtp(smtpd_server).send(make_message(), sender=SENDER, recipients=[TO])
    assert (caught.value.code, caught.value.reply) == (452, "4.3.1 insufficient system storage")


async def test_partial_refusal_is_reported_in_delivery(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    pipelined: bool,
) -> None:
    smtpd_server.fail_rcpt = {"nobody@client.example": "550 5.1.1 no such user"}

    delivery = await make_smtp(smtpd_server).send(
        make_message(), sender=SENDER, recipients=[TO, "nobody@client.example"]
    )

    assert delivery.code == 250
    assert dict(delivery.refused) == {"nobody@client.example": (550, "5.1.1 no such user")}
    assert smtpd_server.messages[0].rcpt_tos == [TO]


@pytest.mark.parametrize(
    ("replies", "error"),
    [
        (["550 5.1.1 no such user", "551 5.1.6 moved"], TransportPermanentError),
        (["550 5.1.1 no such user", "452 4.2.2 mailbox full"], TransportTemporaryError),
    ],
)
async def test_every_recipient_refused(
    smtpd_server: SMTPTestServer,
    make_smtp: MakeSMTP,
    replies: list[str],
    error: type[TransportError],
    pipelined: bool,
) -> None:
    rcpts = ["a@client.example", "b@client.example"]
    smtpd_server.fail_rcpt = dict(zip(rcpts, replies, strict=True))

    with pytest.raises(error) as caught:
        await make_smtp(smtpd_server).send(make_message(), sender=SENDER, recipients=rcpts)

    assert "a@client.example" in str(caught.value)
    assert "b@client.example" in str(caught.value)


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        (SENDER, ["victim@client.example\r\nRCPT TO:<other@client.example>"]),
        (SENDER, ["a@client.example\n"]),
        ("ventes@exemple.fr\x00", [TO]),
        (SENDER, []),
    ],
)
async def test_unsafe_envelope_refused_before_connecting(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP, sender: str, recipients: list[str]
) -> None:
    for transport in (make_smtp(smtpd_server), MemoryTransport()):
        with pytest.raises(TransportPermanentError, match="refused before sending"):
            await transport.send(make_message(), sender=sender, recipients=recipients)
    assert smtpd_server.connections == 0


# --- SMTP: TLS and AUTH ------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_starttls_and_auth(
    smtpd_tls_server: SMTPTestServer, make_smtp: MakeSMTP, pipelining: bool
) -> None:
    server = smtpd_tls_server
    server.pipelining = pipelining
    url = f"smtp+starttls://{server.username}:{server.password}@127.0.0.1:{server.port}"
    transport = SMTPTransport.from_url(url, tls_context=server.client_tls_context, timeout=5)
    try:
        await transport.send(make_message(1), sender=SENDER, recipients=[TO])
        await transport.send(make_message(2), sender=SENDER, recipients=[TO])
    finally:
        await transport.close()

    assert len(server.messages) == 2
    assert server.commands_named("STARTTLS") == [None]
    assert server.auth_attempts == [("PLAIN", "prospect", True)]  # once per connection
    assert server.connections == 1
    # Over TLS too, the envelope goes in one write when the server offers PIPELINING.
    ahead = [rest for verb, rest in server.ahead if verb == "MAIL"]
    assert [b"DATA\r\n" in rest for rest in ahead] == [pipelining, pipelining]


async def test_starttls_is_required_by_the_server(
    smtpd_tls_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_tls_server, start_tls=False)
    with pytest.raises(TransportPermanentError) as caught:
        await transport.send(make_message(), sender=SENDER, recipients=[TO])
    assert caught.value.code == 530


async def test_wrong_password_is_permanent_and_never_echoed(
    smtpd_tls_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    server = smtpd_tls_server
    password = "Wr0ng-p@ss:word"
    transport = make_smtp(
        server, username=server.username, password=password, tls_context=server.client_tls_context
    )

    with pytest.raises(TransportPermanentError) as caught:
        await transport.send(make_message(), sender=SENDER, recipients=[TO])

    error = caught.value
    assert error.code == 535
    assert "authentication failed" in str(error)
    texts = [str(error), repr(error), error.reply, str(error.__cause__), repr(transport)]
    assert not [text for text in texts if password in text]
    assert server.messages == []


async def test_untrusted_certificate_fails(
    smtpd_tls_server: SMTPTestServer, make_smtp: MakeSMTP
) -> None:
    transport = make_smtp(smtpd_tls_server, start_tls=True)  # system trust store: no test CA
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await transport.send(make_message(), sender=SENDER, recipients=[TO])


async def test_implicit_tls(smtpd_implicit_tls_server: SMTPTestServer) -> None:
    server = smtpd_implicit_tls_server
    assert server.password is not None
    url = f"smtps://{server.username}:{quote(server.password)}@127.0.0.1:{server.port}"
    async with SMTPTransport.from_url(url, tls_context=server.client_tls_context) as transport:
        delivery = await transport.send(make_message(), sender=SENDER, recipients=[TO])

    assert delivery.code == 250
    assert server.messages[0].data == wire_bytes(make_message())
    assert server.auth_attempts == [("PLAIN", "prospect", True)]
    assert server.commands_named("STARTTLS") == []


# --- SMTP: configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mx.example", ("mx.example", 25, False, None, None, None)),
        ("smtp://u:p@MX.Example:2525", ("mx.example", 2525, False, None, "u", "p")),
        ("smtps://u:p@mx.example", ("mx.example", 465, True, False, "u", "p")),
        ("smtp+starttls://u:p@mx.example", ("mx.example", 587, False, True, "u", "p")),
        ("SMTP+STARTTLS://mx.example:1587/", ("mx.example", 1587, False, True, None, None)),
        (
            "smtp://a%40b.fr:p%40ss%2Fw%3Ard@[::1]:25",
            ("::1", 25, False, None, "a@b.fr", "p@ss/w:rd"),
        ),
        ("smtp://user@mx.example", ("mx.example", 25, False, None, "user", None)),
    ],
)
def test_from_url(url: str, expected: tuple[object, ...]) -> None:
    t = SMTPTransport.from_url(url)
    assert (t.host, t.port, t.use_tls, t.start_tls, t.username, t._password) == expected


def test_from_url_passes_options() -> None:
    t = SMTPTransport.from_url("smtp://mx.example", timeout=3, pool_size=2, max_idle=5)
    assert (t.timeout, t.pool_size, t.max_idle) == (3, 2, 5)


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("http://u:s3cret@mx.example", "scheme"),
        ("mx.example:25", "scheme"),
        ("smtp://u:s3cret@:25", "host"),
        ("smtp://u:s3cret@mx.example:abc", "port"),
        ("smtp://u:s3cret@mx.example:70000", "port"),
        ("smtp://u:s3cret@mx.example:0", "port"),
        ("smtp://u:s3c/ret@mx.example", "port"),  # an unencoded "/" cuts the URL short
        ("smtp://u:s3cret@mx.example/inbox", "path"),
        ("smtp://u:s3cret@mx.example?timeout=3", "query"),
        ("smtp://:s3cret@mx.example", "user name"),
        ("smtp://u:s3cret@[::1", "host"),
    ],
)
def test_from_url_errors_name_the_part_and_hide_the_password(url: str, part: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SMTPTransport.from_url(url)
    assert part in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "s3c" not in str(caught.value)


def test_bad_constructor_options() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        SMTPTransport("mx.example", 465, use_tls=True, start_tls=True)
    with pytest.raises(ConfigError, match="pool_size"):
        SMTPTransport("mx.example", 25, pool_size=0)


def test_repr_hides_password() -> None:
    transport = SMTPTransport.from_url("smtps://bob:hunter2@mx.example")
    assert "hunter2" not in repr(transport)
    assert "hunter2" not in str(transport)
    assert repr(transport) == (
        "SMTPTransport(host='mx.example', port=465, tls='implicit', username='bob', pool_size=4)"
    )


async def test_transport_from_settings(tmp_path: Path) -> None:
    smtp = await transport_from_settings("smtp+starttls://mx.example", tmp_path)
    outbox = await transport_from_settings(None, tmp_path)
    assert isinstance(smtp, SMTPTransport)
    assert smtp.start_tls is True
    assert isinstance(outbox, OutboxTransport)
    assert outbox.directory == tmp_path


def test_transports_satisfy_the_protocol(tmp_path: Path) -> None:
    transports: list[Transport] = [
        SMTPTransport("mx.example", 25),
        OutboxTransport(tmp_path),
        MemoryTransport(),
    ]
    assert [t.name for t in transports] == ["smtp", "outbox", "memory"]


def test_delivery_is_frozen() -> None:
    delivery = Delivery(250, "ok", "smtp")
    assert delivery.refused == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        delivery.code = 550  # type: ignore[misc]


# --- Outbox ------------------------------------------------------------------------------------


def names_in(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included (sync: the lint keeps file I/O out of
    coroutines)."""
    return sorted(p.name for p in folder.iterdir())


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_outbox_writes_parseable_eml_atomically(tmp_path: Path) -> None:
    outbox = OutboxTransport(tmp_path / "out" / "box")  # created on demand
    message = make_message()

    delivery = await outbox.send(message, sender=SENDER, recipients=[TO])

    (name,) = names_in(tmp_path / "out" / "box")  # no temporary file left behind
    path = tmp_path / "out" / "box" / name
    assert delivery == Delivery(250, f"written to {path}", "outbox")
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-msg-1@exemple\.fr\.eml", path.name)
    assert read(path) == wire_bytes(message)  # exact bytes, CRLF
    parsed = email.message_from_bytes(read(path), policy=email.policy.default)
    assert parsed["Subject"] == "Proposition n°1"
    assert parsed.get_content() == message.get_content().replace("\n", "\r\n")


async def test_outbox_same_message_id_never_overwrites(tmp_path: Path) -> None:
    outbox = OutboxTransport(tmp_path)
    await asyncio.gather(
        *(outbox.send(make_message(1), sender=SENDER, recipients=[TO]) for _ in range(20))
    )
    names = names_in(tmp_path)
    assert len(names) == 20
    assert all(name.endswith(".eml") and not name.startswith(".") for name in names)


async def test_outbox_without_message_id_uses_a_uuid(tmp_path: Path) -> None:
    message = make_message()
    del message["Message-ID"]
    message["Message-ID"] = "<../../etc/passwd>"
    await OutboxTransport(tmp_path).send(message, sender=SENDER, recipients=[TO])
    del message["Message-ID"]
    await OutboxTransport(tmp_path).send(message, sender=SENDER, recipients=[TO])

    names = names_in(tmp_path)
    assert len(names) == 2
    assert all("/" not in name and name.endswith(".eml") for name in names)
    assert any(re.search(r"-[0-9a-f]{32}\.eml$", name) for name in names)


async def test_outbox_unwritable_directory_is_a_transport_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the folder should be")
    outbox = OutboxTransport(blocker / "outbox")

    with pytest.raises(TransportTemporaryError, match="outbox: cannot write") as caught:
        await outbox.send(make_message(), sender=SENDER, recipients=[TO])

    assert isinstance(caught.value.__cause__, OSError)
    await outbox.close()


# --- Memory ------------------------------------------------------------------------------------


async def test_memory_transport_records_and_fails_on_demand() -> None:
    memory = MemoryTransport()
    memory.fail_next(2)
    memory.fail_next(1, TransportPermanentError("refused", code=550))

    for expected in (TransportTemporaryError, TransportTemporaryError, TransportPermanentError):
        with pytest.raises(expected):
            await memory.send(make_message(), sender=SENDER, recipients=[TO])
    message = make_message()
    delivery = await memory.send(message, sender=SENDER, recipients=(TO, "b@client.example"))

    assert delivery == Delivery(250, "kept in memory", "memory")
    assert memory.sent == [(SENDER, (TO, "b@client.example"), message)]
    assert memory.sent[0].message is message
    await memory.close()


async def test_a_bare_string_recipient_is_one_address(tmp_path: Path) -> None:
    memory = MemoryTransport()
    await memory.send(make_message(), sender=SENDER, recipients=TO)
    assert memory.sent[0].recipients == (TO,)


@pytest.mark.parametrize("size_mb", [2])
async def test_big_message_data_is_prepared_off_loop_with_identical_wire_bytes(
    smtpd_server: SMTPTestServer, size_mb: int
) -> None:
    """Big DATA takes our threaded path: same dot-stuffing and line ends as aiosmtplib's."""
    line = b"." + b"x" * 70 + b"\r\n"
    body = line * (size_mb * 1024 * 1024 // len(line))
    head = b"From: a@x.example\r\nTo: b@y.example\r\nSubject: big\r\nMessage-ID: <big@x>\r\n\r\n"
    small = head + b".leading dot\nlone LF\rlone CR\r\n"
    transport = SMTPTransport(smtpd_server.host, smtpd_server.port, timeout=30)
    await transport.send(head + small.split(b"\r\n\r\n", 1)[1] + body, sender=SENDER,
                         recipients=[TO])  # fmt: skip
    await transport.send(small, sender=SENDER, recipients=[TO])
    await transport.close()
    big_received = smtpd_server.messages[0].data
    small_received = smtpd_server.messages[1].data
    # the server undid the dot-stuffing: what arrives is the message with CRLF line ends
    assert big_received.endswith(body)
    assert b".leading dot\r\nlone LF\r\nlone CR\r\n" in big_received
    assert b".leading dot\r\nlone LF\r\nlone CR\r\n" in small_received  # stock path agrees


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.from_regex(PLAIN_ADDRESS, fullmatch=True),
        st.text(alphabet=st.sampled_from(list('ab.@"<> \\()[],:;é+%!-')), max_size=20),
    )
)
def test_plain_address_fast_path_quotes_as_aiosmtplib_does(address: str) -> None:
    """MAIL/RCPT skip aiosmtplib's parse only where it would return the address unchanged."""
    if PLAIN_ADDRESS.fullmatch(address):
        assert aiosmtplib.email.quote_address(address) == f"<{address}>"


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        ("bounce+x1@exemple.fr", "o'neil.x+tag@client.example"),  # fast path
        ("Ventes <ventes@exemple.fr>", '"a b"@client.example'),  # aiosmtplib's own path
    ],
)
async def test_mail_and_rcpt_commands_on_both_address_paths(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP, sender: str, recipient: str
) -> None:
    transport = make_smtp(smtpd_server)
    await transport.send(make_message(), sender=sender, recipients=[recipient])
    address = aiosmtplib.email.parse_address
    assert smtpd_server.commands_named("MAIL")[-1].startswith(f"FROM:<{address(sender)}>")
    assert smtpd_server.commands_named("RCPT") == [f"TO:<{address(recipient)}>"]
    smtpd_server.fail_rcpt[recipient] = "550 5.1.1 no such user"
    with pytest.raises(TransportPermanentError, match="no such user"):
        await transport.send(make_message(), sender=sender, recipients=[recipient])


# --- SMTP: pipelining (RFC 2920) ------------------------------------------------------------


async def test_pipelining_writes_the_envelope_at_once(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP, pipelined: bool
) -> None:
    transport = make_smtp(smtpd_server)
    rcpts = [TO, "autre@client.example"]
    for n in range(2):
        await transport.send(make_message(n), sender=SENDER, recipients=rcpts)

    ahead = dict(smtpd_server.ahead[-4:])  # MAIL, RCPT, RCPT, DATA of the second message
    if pipelined:  # when MAIL was read, both RCPT and DATA had already arrived
        assert ahead["MAIL"] == b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + (
            b"DATA\r\n"
        )
    else:
        assert ahead["MAIL"] == b""
    # The same bytes arrive either way, the message only once DATA was accepted.
    assert [m.data for m in smtpd_server.messages] == [
        wire_bytes(make_message(0)),
        wire_bytes(make_message(1)),
    ]
    assert [m.rcpt_tos for m in smtpd_server.messages] == [rcpts, rcpts]
    size = len(wire_bytes(make_message(1)))
    assert smtpd_server.commands_named("MAIL")[-1].lower() == f"from:<{SENDER}> size={size}"
    assert smtpd_server.connections == 1


Answer = Callable[[bytes], "bytes | None"]


@contextlib.asynccontextmanager
async def scripted_smtp(
    answer: Answer, *, dribble: bool = False, rcpt_delay: float = 0.0
) -> AsyncIterator[int]:
    """A bare SMTP server on 127.0.0.1 whose replies are a script: ``answer(line)`` gives the
    bytes to write back for each line received (``b""``: nothing; ``None``: hang up; after a
    421 reply it hangs up too). With ``dribble``, replies go out one byte per write; each RCPT
    is answered ``rcpt_delay`` seconds after it is read (a server checking recipients). Yields
    the port."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted ESMTP\r\n")
        try:
            while line := await reader.readline():
                if rcpt_delay and line[:4].upper() == b"RCPT":
                    await asyncio.sleep(rcpt_delay)
                out = answer(line)
                if out is None:
                    break
                for chunk in [out[i : i + 1] for i in range(len(out))] if dribble else [out]:
                    writer.write(chunk)
                    await writer.drain()
                if out.startswith(b"421"):
                    break
        finally:
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def script(
    received: list[bytes], *, mail: bytes = b"250 ok", rcpt: bytes = b"250 ok",
    data: bytes = b"354 go on", end: bytes = b"250 queued",
) -> Answer:  # fmt: skip
    """A server offering PIPELINING with these replies; records every line in ``received``."""
    in_body = False

    def answer(line: bytes) -> bytes | None:
        nonlocal in_body
        received.append(line)
        if in_body:
            if line == b".\r\n":
                in_body = False
                return end + b"\r\n"
            return b""
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        if verb == b"MAIL":
            return mail + b"\r\n"
        if verb == b"RCPT":
            return rcpt + b"\r\n"
        if verb == b"DATA":
            in_body = data.startswith(b"354")
            return data + b"\r\n"
        if verb == b"QUIT":
            return None
        return b"250 ok\r\n"  # RSET, NOOP

    return answer


async def test_pipelined_replies_dribbled_byte_by_byte() -> None:
    received: list[bytes] = []
    async with (
        scripted_smtp(script(received), dribble=True) as port,
        SMTPTransport("127.0.0.1", port, timeout=5) as transport,
    ):
        for n in range(2):
            delivery = await transport.send(make_message(n), sender=SENDER, recipients=[TO])
            assert (delivery.code, delivery.reply) == (250, "queued")
    assert received.count(b".\r\n") == 2
    assert sum(line.startswith(b"EHLO") for line in received) == 1  # one connection reused


async def test_data_accepted_despite_every_recipient_refused_is_ended_empty() -> None:
    """RFC 2920 3.1: the client must check every reply; a 354 after refused recipients gets
    a lone dot (an empty message nobody receives), then RSET."""
    received: list[bytes] = []
    answer = script(received, rcpt=b"550 5.1.1 no such user", end=b"554 5.5.1 no recipients")
    async with (
        scripted_smtp(answer) as port,
        SMTPTransport("127.0.0.1", port, timeout=5) as transport,
    ):
        with pytest.raises(TransportPermanentError) as caught:
            await transport.send(make_message(), sender=SENDER, recipients=[TO])
    assert caught.value.code == 550
    after_data = received[received.index(b"DATA\r\n") + 1 :]
    assert after_data[:2] == [b".\r\n", b"RSET\r\n"]  # not one line of the message
    assert not any(line.startswith(b"Subject") for line in received)


async def test_mail_refused_with_421_and_a_hang_up_mid_pipeline() -> None:
    """The server answers MAIL and hangs up with RCPT and DATA unanswered: its reply is the
    error, not the lost connection."""
    received: list[bytes] = []
    answer = script(received, mail=b"421 4.3.2 shutting down")
    async with (
        scripted_smtp(answer) as port,
        SMTPTransport("127.0.0.1", port, timeout=5) as transport,
    ):
        with pytest.raises(TransportTemporaryError) as caught:
            await transport.send(make_message(), sender=SENDER, recipients=[TO])
    assert (caught.value.code, caught.value.reply) == (421, "4.3.2 shutting down")
    assert b"RSET\r\n" not in received  # 421: the connection is closed, not reset


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ({"data": b"no status code here"}, "Malformed SMTP response line"),
        ({"end": b"\x00garbage"}, "Malformed SMTP response line"),
    ],
)
async def test_malformed_replies_are_temporary_and_the_connection_dropped(
    replies: dict[str, bytes], expected: str
) -> None:
    received: list[bytes] = []
    async with (
        scripted_smtp(script(received, **replies)) as port,
        SMTPTransport("127.0.0.1", port, timeout=5) as transport,
    ):
        with pytest.raises(TransportTemporaryError, match=expected):
            await transport.send(make_message(), sender=SENDER, recipients=[TO])
        assert transport._idle == []  # never pooled again


async def test_no_reply_to_the_envelope_times_out() -> None:
    received: list[bytes] = []
    base = script(received)

    def silent_on_data(line: bytes) -> bytes | None:
        out = base(line)
        return b"" if line == b"DATA\r\n" else out

    async with (
        scripted_smtp(silent_on_data) as port,
        SMTPTransport("127.0.0.1", port, timeout=0.3) as transport,
    ):
        started = time.monotonic()
        with pytest.raises(TransportTemporaryError, match="timed out"):
            await transport.send(make_message(), sender=SENDER, recipients=[TO])
    assert time.monotonic() - started < 2


async def test_each_pipelined_reply_has_its_own_time() -> None:
    """Five recipients answered 0.3 s apart with a 1 s timeout: no reply is late, so the
    message goes through, as it does one command at a time (found in review)."""
    received: list[bytes] = []
    rcpts = [f"r{i}@client.example" for i in range(5)]
    async with (
        scripted_smtp(script(received), rcpt_delay=0.3) as port,
        SMTPTransport("127.0.0.1", port, timeout=1) as transport,
    ):
        delivery = await transport.send(make_message(), sender=SENDER, recipients=rcpts)
    assert delivery.code == 250
    assert sum(line.startswith(b"RCPT") for line in received) == 5


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        pytest.param("data_4xx", 451, marks=pytest.mark.smtp_fault("data_4xx")),
        pytest.param("data_5xx", 554, marks=pytest.mark.smtp_fault("data_5xx")),
        pytest.param("disconnect", None, marks=pytest.mark.smtp_fault("disconnect_on_data")),
    ],
)
async def test_big_message_refused_or_cut_off_as_a_small_one_is(
    smtpd_server: SMTPTestServer, make_smtp: MakeSMTP, fault: str, code: int | None
) -> None:
    """The big-message DATA path (over 1 MB, prepared off the loop) reports refusals and lost
    connections as the stock path does, and never sends the message a second time."""
    big = wire_bytes(make_message()) + (b"y" * 70 + b"\r\n") * 16000  # 1.15 MB
    transport = make_smtp(smtpd_server)
    with pytest.raises(
        TransportPermanentError if code == 554 else TransportTemporaryError
    ) as caught:
        await transport.send(big, sender=SENDER, recipients=[TO])
    assert caught.value.code == code
    assert smtpd_server.messages == []
    assert len(smtpd_server.commands_named("DATA")) == 1  # no second attempt
    assert transport._idle == []  # the connection is not pooled again
