"""Never an open relay: networks, AUTH only over TLS, smuggling, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest
from relay_fixtures import (
    MAILTO_DOMAIN,
    MARIE,
    PAUL,
    SENDER,
    MakeRelayEnv,
    RelayEnv,
    close_client,
    raw_exchange,
    relay_message,
    smtp_exchange,
    wire,
)

from prospect_mailer.addresses import normalise
from prospect_mailer.relay_config import hash_password

PASSWORD = "correct horse battery staple"


async def test_client_from_a_non_allowed_address_cannot_relay(relay_env: RelayEnv) -> None:
    ex = await smtp_exchange(relay_env.port, [MARIE], b"", source="127.0.0.2")
    assert ex.rcpt[MARIE][0] == 554
    assert ex.rcpt[MARIE][1].startswith("5.7.1")
    assert "relay access denied" in ex.rcpt[MARIE][1]
    assert relay_env.sink.messages == []


async def test_auth_over_plain_text_is_refused(relay_env: RelayEnv) -> None:
    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay_env.port, timeout=10) as client:
            client.ehlo("client.test")
            assert not client.has_extn("auth")  # not even offered without TLS
            return client.docmd("AUTH", "PLAIN AHByb3NwZWN0AHNlY3JldA==")

    code, text = await asyncio.to_thread(attempt)
    assert code in (530, 538), text
    assert b"Encryption required" in text


@pytest.fixture
async def tls_relay(
    make_relay_env: MakeRelayEnv, smtp_server_tls_context: ssl.SSLContext
) -> RelayEnv:
    return await make_relay_env(
        server_kwargs={"tls_context": smtp_server_tls_context},
        users=[
            {"username": "crm", "password_hash": hash_password(PASSWORD), "campaign": "spring"},
        ],
    )


async def test_auth_after_starttls_lets_a_remote_client_relay(
    tls_relay: RelayEnv, smtp_client_tls_context: ssl.SSLContext
) -> None:
    data = wire(relay_message(MARIE, campaign=None))  # campaign bound by the AUTH user
    ex = await smtp_exchange(
        tls_relay.port,
        [MARIE],
        data,
        source="127.0.0.2",
        tls=smtp_client_tls_context,
        login=("crm", PASSWORD),
    )
    assert "AUTH LOGIN PLAIN" in ex.ehlo.splitlines()  # PLAIN and LOGIN, nothing else
    assert ex.rcpt[MARIE][0] == 250
    assert ex.data is not None
    assert ex.data[0] == 250, ex
    assert len(tls_relay.received_by(MARIE)) == 1


async def test_wrong_password_is_535(
    tls_relay: RelayEnv, smtp_client_tls_context: ssl.SSLContext
) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
        await smtp_exchange(
            tls_relay.port,
            [MARIE],
            None,
            source="127.0.0.2",
            tls=smtp_client_tls_context,
            login=("crm", "guess"),
        )
    assert caught.value.smtp_code == 535


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n", id="LF.LF"),
        pytest.param(b"Subject: x\r\n\r\nhello\r.\rMAIL FROM:<evil@x>\r\n", id="CR.CR"),
        pytest.param(b"Subject: x\r\n\r\nhello\r\n.\nMAIL FROM:<evil@x>\r\n", id="CRLF.LF"),
        pytest.param(b"Subject: x\n\nbare line feeds only\r\n", id="bare-LF"),
    ],
)
async def test_smuggling_sequences_and_bare_line_breaks_are_refused(
    relay_env: RelayEnv, payload: bytes
) -> None:
    lines = [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<ventes@acme.example>\r\n",
        f"RCPT TO:<{MARIE}>\r\n".encode(),
        b"DATA\r\n",
        payload + b".\r\n",
        b"QUIT\r\n",
    ]
    replies = await raw_exchange(relay_env.port, lines, wait_for=12)
    data_reply = next(r for r in replies if r[:3] in ("250", "550") and "5.5.2" in r)
    assert data_reply.startswith("550 5.5.2")
    assert "bare CR or LF" in data_reply
    assert not any("evil" in (arg or "") for _, arg in relay_env.sink.commands)
    assert relay_env.sink.messages == []


async def test_size_and_recipient_limits(make_relay_env: MakeRelayEnv) -> None:
    env = await make_relay_env(max_recipients=1, max_message_size=4096)
    ex = await smtp_exchange(env.port, [MARIE, PAUL], wire(relay_message(MARIE)))
    assert ex.rcpt[PAUL][0] == 452
    assert ex.rcpt[PAUL][1].startswith("4.5.3")
    assert ex.data is not None
    assert ex.data[0] == 552
    assert env.sink.messages == []


async def test_connections_per_client_are_limited(make_relay_env: MakeRelayEnv) -> None:
    env = await make_relay_env(max_connections_per_client=2)
    opened = [await asyncio.open_connection("127.0.0.1", env.port) for _ in range(3)]
    try:
        greetings = [await asyncio.wait_for(r.readline(), 5) for r, _ in opened]
        assert [g[:3] for g in greetings] == [b"220", b"220", b"421"]
        assert b"Too many connections" in greetings[2]
    finally:
        for _, w in opened:
            await close_client(w)


async def test_opt_out_address_is_accepted_from_anywhere_but_nothing_else(
    relay_env: RelayEnv,
) -> None:
    # A real relayed message gives a real mailto token; then an outside server mails it.
    await smtp_exchange(relay_env.port, [MARIE], wire(relay_message(MARIE)))
    (data,) = relay_env.received_by(MARIE)
    token = data.split(b"mailto:unsubscribe+", 1)[1].split(b"@", 1)[0].decode()
    optout = f"unsubscribe+{token}@{MAILTO_DOMAIN}"
    ex = await smtp_exchange(
        relay_env.port,
        [optout, PAUL],
        b"Subject: unsubscribe\r\n\r\nstop\r\n",
        sender="marie.curie@radium.example",
        source="127.0.0.2",
    )
    assert ex.rcpt[PAUL][0] == 554  # still not a relay for anything else
    assert ex.rcpt[optout][0] == 250
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    hits = await relay_env.store.suppression.lookup([normalise(MARIE).key_hash])
    assert hits


async def test_opt_out_route_reaches_the_inbound_handler(make_relay_env: MakeRelayEnv) -> None:
    calls: list[tuple[str, bytes]] = []

    class Answer:
        accepted = True
        reply = "250 2.0.0 unsubscribed"

    async def handler(optout: object, rcpt: str, data: bytes) -> Answer:
        calls.append((rcpt, data))
        return Answer()

    env = await make_relay_env(server_kwargs={"inbound": handler})
    rcpt = f"Unsubscribe+ABCDEF@{MAILTO_DOMAIN.upper()}"
    ex = await smtp_exchange(env.port, [rcpt], b"Subject: stop\r\n\r\nstop\r\n", source="127.0.0.2")
    assert ex.data == (250, "2.0.0 1 delivered")
    assert calls == [(rcpt, b"Subject: stop\r\n\r\nstop\r\n")]
    # Another domain is not an opt-out route.
    ex = await smtp_exchange(
        env.port, ["unsubscribe+ABCDEF@evil.example"], None, source="127.0.0.2"
    )
    assert ex.rcpt["unsubscribe+ABCDEF@evil.example"][0] == 554


async def test_shutdown_finishes_the_transaction_in_flight_then_answers_421(
    relay_env: RelayEnv,
) -> None:
    relay_env.sink.data_delay = 0.5  # the upstream is slow: the DATA is in flight at SIGTERM
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_env.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", relay_env.port)
    try:
        await reader.readline()
        await idle_reader.readline()
        body = wire(relay_message(MARIE))
        for line in (
            b"HELO client.test\r\n",
            b"MAIL FROM:<ventes@acme.example>\r\n",
            f"RCPT TO:<{MARIE}>\r\n".encode(),
            b"DATA\r\n",
        ):
            writer.write(line)
            await writer.drain()
            await reader.readline()
        writer.write(body + b".\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # the relay is now delivering upstream
        stopping = asyncio.create_task(relay_env.relay.stop())
        idle_reply = await asyncio.wait_for(idle_reader.readline(), 5)
        assert idle_reply.startswith(b"421 4.3.2")  # idle client told at once
        data_reply = await asyncio.wait_for(reader.readline(), 5)
        assert data_reply.startswith(b"250"), data_reply  # the in-flight message completed
        writer.write(b"MAIL FROM:<ventes@acme.example>\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"421 4.3.2")
        await stopping
        assert relay_env.relay.connections == 0
        assert len(relay_env.received_by(MARIE)) == 1
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", relay_env.port)  # no longer listening
    finally:
        for w in (writer, idle_writer):
            await close_client(w)


async def test_connection_counts_return_to_zero_for_any_peer(make_relay_env: MakeRelayEnv) -> None:
    """A peer that is no IP address (a Unix socket's empty name) was counted under its name
    but released under "None": its count only grew, until it was refused for good."""
    env = await make_relay_env(max_connections_per_client=2)
    for peer in ("", "127.0.0.1", "::ffff:127.0.0.1", "fe80::1%eth0"):
        for _ in range(3):  # more than the limit, one after the other
            session = env.relay._make_session()
            assert env.relay.admit(session, peer) is None
            env.relay.release(session)
    assert env.relay._per_ip == {}
    assert env.relay.connections == 0


async def test_a_silent_client_is_disconnected_after_the_command_timeout(
    make_relay_env: MakeRelayEnv,
) -> None:
    """The inactivity timer: every command pushes the deadline on; silence closes the session.

    The relay keeps one loop timer per session and moves a deadline (not aiosmtpd's new timer
    per command), so this checks both halves: a client that keeps talking for longer than the
    timeout in total stays connected, and one that then falls silent is closed on time.
    """
    env = await make_relay_env(command_timeout=0.6)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        assert (await reader.readline()).startswith(b"220")
        started = loop.time()
        for _ in range(6):  # 1.2 s of commands, each well inside the 0.6 s timeout
            await asyncio.sleep(0.2)
            writer.write(b"NOOP\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250")
        assert loop.time() - started > 1.0
        silent = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the relay
        waited = loop.time() - silent
        assert 0.5 <= waited < 1.5, waited
    finally:
        writer.close()


async def test_a_tls_client_gone_during_the_delivery_does_not_lose_the_message(
    tls_relay: RelayEnv, smtp_client_tls_context: ssl.SSLContext
) -> None:
    """As without TLS (test_relay_upstream): the client sends its final dot over STARTTLS and
    drops the connection before the reply; the delivery runs to its end, and the client's
    retry is told the truth."""
    tls_relay.sink.data_delay = 1.0
    data = wire(relay_message(MARIE, message_id="<tls-gone@crm.example>"))

    def send_and_drop() -> None:
        client = smtplib.SMTP("127.0.0.1", tls_relay.port, timeout=10)
        client.ehlo("client.test")
        client.starttls(context=smtp_client_tls_context)
        client.ehlo("client.test")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(MARIE)[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(data + b"\r\n.\r\n")
        client.close()  # gone before the relay's answer

    await asyncio.to_thread(send_and_drop)
    assert len(await tls_relay.delivered_to(MARIE)) == 1
    tls_relay.sink.data_delay = 0.0
    await asyncio.sleep(0.3)  # its result recorded
    ex = await smtp_exchange(tls_relay.port, [MARIE], data, tls=smtp_client_tls_context)
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert "by an earlier attempt" in ex.data[1]
    assert len(tls_relay.received_by(MARIE)) == 1
