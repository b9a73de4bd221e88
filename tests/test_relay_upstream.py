"""The relay and its upstream: nothing lost (451), idempotent retries, 5xx, pooling, DKIM, swaks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from relay_fixtures import (
    MARIE,
    PAUL,
    SENDER,
    MakeRelayEnv,
    RelayEnv,
    close_client,
    relay_message,
    smtp_exchange,
    wire,
)

from prospect_mailer.transport import OutboxTransport


async def test_upstream_stopped_mid_transaction_gives_451_and_retry_delivers_once(
    make_relay_env: MakeRelayEnv,
) -> None:
    relay_env = await make_relay_env(concurrency=1)  # copies in order: the fault hits the 2nd
    data = wire(relay_message(MARIE, PAUL))
    relay_env.sink.fail_after_n_messages = 1  # the first copy goes, then the upstream "dies"
    ex = await smtp_exchange(relay_env.port, [MARIE, PAUL], data)
    assert ex.data is not None
    assert ex.data[0] == 451, ex.data
    assert ex.data[1].startswith("4.3.0")
    assert len(relay_env.sink.messages) == 1
    relay_env.sink.fail_after_n_messages = None  # back up: the client retries the same bytes
    ex = await smtp_exchange(relay_env.port, [MARIE, PAUL], data)
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert sorted(r for m in relay_env.sink.messages for r in m.rcpt_tos) == sorted([MARIE, PAUL])


async def test_restarted_upstream_gives_one_451_then_recovers(relay_env: RelayEnv) -> None:
    # The pooled connection dies with the server; the next message must not fail because of
    # the stale connection once the server is back (no endless run of 451s).
    replies = []
    ex = await smtp_exchange(relay_env.port, [MARIE], wire(relay_message(MARIE)))
    replies.append(ex.data)
    await relay_env.sink.stop()
    ex = await smtp_exchange(relay_env.port, [PAUL], wire(relay_message(PAUL, message_id="<m2@x>")))
    replies.append(ex.data)
    await relay_env.sink.start()
    for i in range(3):
        msg = relay_message(PAUL, message_id=f"<m{3 + i}@x>")
        ex = await smtp_exchange(relay_env.port, [PAUL], wire(msg))
        replies.append(ex.data)
    assert [r[0] for r in replies if r] == [250, 451, 250, 250, 250]


async def test_upstream_5xx_for_the_only_recipient_is_passed_back(relay_env: RelayEnv) -> None:
    relay_env.sink.fail_rcpt = {MARIE: "550 5.1.1 no such user here"}
    ex = await smtp_exchange(relay_env.port, [MARIE], wire(relay_message(MARIE)))
    assert ex.data == (550, "5.1.1 no such user here")


async def test_upstream_5xx_for_one_of_several_recipients_goes_to_a_dsn(
    relay_env: RelayEnv,
) -> None:
    relay_env.sink.fail_rcpt = {PAUL: "550 5.1.1 no such user here"}
    ex = await smtp_exchange(relay_env.port, [MARIE, PAUL], wire(relay_message(MARIE, PAUL)))
    assert ex.data is not None
    assert ex.data[0] == 250
    (dsn,) = relay_env.received_by(SENDER)
    assert b"Final-Recipient: rfc822; " + PAUL.encode() in dsn
    assert b"Status: 5.1.1" in dsn


async def test_outbox_upstream_writes_one_file_per_recipient(
    make_relay_env: MakeRelayEnv, tmp_path: Path
) -> None:
    env = await make_relay_env(transport=OutboxTransport(tmp_path / "outbox"))
    ex = await smtp_exchange(env.port, [MARIE, PAUL], wire(relay_message(MARIE, PAUL)))
    assert ex.data is not None
    assert ex.data[0] == 250
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2
    assert env.sink.messages == []


async def test_swaks_through_the_relay(relay_env: RelayEnv, tmp_path: Path) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed (Debian package 'swaks'; make sysdeps installs it)")
    eml = tmp_path / "message.eml"
    eml.write_bytes(wire(relay_message(MARIE)))
    proc = await asyncio.create_subprocess_exec(
        swaks,
        "--server", f"127.0.0.1:{relay_env.port}",
        "--from", SENDER,
        "--to", MARIE,
        "--data", str(eml),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    assert b"<-  250 2.0.0 1 delivered" in out
    (data,) = relay_env.received_by(MARIE)
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in data


async def test_a_client_gone_during_the_delivery_does_not_lose_the_message(
    relay_env: RelayEnv,
) -> None:
    """The client hangs up after its final dot, while the relay waits for the upstream's
    reply. The delivery runs to its end all the same (the upstream accepts it, the send is
    recorded ``sent``), so the client's retry of the same message, answered "already
    delivered", is true. Cancelled half-way, the claim would stay ``pending`` with nothing
    delivered, and that retry would get a 250 for mail never sent."""
    relay_env.sink.data_delay = 1.0  # the upstream takes a second to accept the message
    data = wire(relay_message(MARIE, message_id="<gone@crm.example>"))
    _, writer = await _send_up_to_the_final_dot(relay_env.port, data)
    try:
        await asyncio.sleep(0.2)  # the relay is now waiting for the upstream's reply
    finally:
        await close_client(writer)  # gone before the relay's answer
    assert len(await relay_env.delivered_to(MARIE)) == 1
    relay_env.sink.data_delay = 0.0
    for _ in range(100):  # the result is recorded once the upstream has accepted
        events = await relay_env.store.audit.events()
        if any(e.status == "sent" for e in events):
            break
        await asyncio.sleep(0.05)
    assert [e.status for e in events if e.kind == "send"][-2:] == ["pending", "sent"]
    ex = await smtp_exchange(relay_env.port, [MARIE], data)  # the client's retry
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert "by an earlier attempt" in ex.data[1]
    assert len(relay_env.received_by(MARIE)) == 1


async def _send_up_to_the_final_dot(
    port: int, data: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client: EHLO, MAIL, RCPT, DATA and the message with its final dot; no reply read
    to it. Returns the connection's reader and writer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()  # greeting
    for command in (b"EHLO client.test", f"MAIL FROM:<{SENDER}>".encode(),
                    f"RCPT TO:<{MARIE}>".encode(), b"DATA"):  # fmt: skip
        writer.write(command + b"\r\n")
        line = await reader.readline()
        while line[3:4] == b"-":  # EHLO's lines
            line = await reader.readline()
        assert line[:1] in (b"2", b"3"), line
    writer.write(data + b"\r\n.\r\n")
    await writer.drain()
    return reader, writer


async def test_a_client_that_half_closes_after_its_final_dot_gets_the_reply(
    relay_env: RelayEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd ends a session at EOF, cancelling what it was doing; a client that shuts its
    side down after the final dot (and waits for the reply) gets it, after the delivery."""
    relay_env.sink.data_delay = 0.5
    data = wire(relay_message(MARIE, message_id="<half@crm.example>"))
    reader, writer = await _send_up_to_the_final_dot(relay_env.port, data)
    try:
        await asyncio.sleep(0.1)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply.startswith(b"250 "), reply
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then the relay closes
    finally:
        await close_client(writer)
    assert len(relay_env.received_by(MARIE)) == 1
    await asyncio.sleep(0.05)
    assert "relay: unexpected error" not in caplog.text  # the session's end is no error
    assert relay_env.relay.connections == 0


async def test_a_relay_stopping_lets_a_delivery_under_way_finish(
    make_relay_env: MakeRelayEnv,
) -> None:
    """Past the shutdown grace the client gets 421 (and retries), but the delivery already
    under way is not cut half-way: it reaches the upstream and is recorded ``sent`` before
    the relay has stopped, so the retry's "delivered by an earlier attempt" is true."""
    relay_env = await make_relay_env(shutdown_grace=0.0)
    relay_env.sink.data_delay = 1.0
    data = wire(relay_message(MARIE, message_id="<stop@crm.example>"))
    reader, writer = await _send_up_to_the_final_dot(relay_env.port, data)
    try:
        await asyncio.sleep(0.2)  # the relay waits for the upstream's reply
        await relay_env.relay.stop()
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply.startswith(b"421 "), reply
    finally:
        await close_client(writer)
    assert len(relay_env.received_by(MARIE)) == 1  # delivered before stop() returned
    events = await relay_env.store.audit.events()
    assert [e.status for e in events if e.kind == "send"][-2:] == ["pending", "sent"]


async def test_an_error_in_a_delivery_whose_client_left_is_logged_and_the_session_ends(
    relay_env: RelayEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody is left to answer: the error is logged as any other, and the session is let
    go of (no connection counted, no task left failing)."""

    async def failing(envelope: object) -> str:
        await asyncio.sleep(0.3)
        raise RuntimeError("boom after the client left")

    relay_env.relay.handler._data = failing  # type: ignore[method-assign]
    data = wire(relay_message(MARIE, message_id="<boom@crm.example>"))
    _, writer = await _send_up_to_the_final_dot(relay_env.port, data)
    await asyncio.sleep(0.1)
    (session,) = relay_env.relay._sessions
    await close_client(writer)
    for _ in range(100):
        if "boom after the client left" in caplog.text and relay_env.relay.connections == 0:
            break
        await asyncio.sleep(0.02)
    assert "relay: unexpected error" in caplog.text
    assert "boom after the client left" in caplog.text
    assert caplog.text.count("relay: unexpected error") == 1  # the session's end is no error
    assert relay_env.relay.connections == 0
    task = session._handler_coroutine
    assert task is not None
    await asyncio.wait_for(asyncio.wait([task]), 5)
    # Ended (or cancelled, as aiosmtpd ends a session), not failing on a reply to nobody.
    assert task.cancelled() or task.exception() is None


async def test_a_retry_while_the_earlier_attempt_is_still_delivering_is_asked_to_wait(
    relay_env: RelayEnv,
) -> None:
    """The client hangs up during a delivery and retries at once: the earlier attempt's
    claim is taken but its outcome unknown, so the retry gets 451 (not "delivered by an
    earlier attempt", which would be a 250 for mail that may still fail). Once it has
    ended, the next retry is told the truth, and the mail went once."""
    relay_env.sink.data_delay = 1.0
    data = wire(relay_message(MARIE, message_id="<again@crm.example>"))
    _, writer = await _send_up_to_the_final_dot(relay_env.port, data)
    await asyncio.sleep(0.2)
    await close_client(writer)
    ex = await smtp_exchange(relay_env.port, [MARIE], data)  # the earlier one still runs
    assert ex.data is not None
    assert ex.data[0] == 451, ex.data
    assert "still being delivered" in ex.data[1]
    assert len(await relay_env.delivered_to(MARIE)) == 1
    await asyncio.sleep(0.2)  # its result recorded
    ex = await smtp_exchange(relay_env.port, [MARIE], data)
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert "by an earlier attempt" in ex.data[1]
    assert len(relay_env.received_by(MARIE)) == 1


async def test_a_recipient_named_twice_in_one_message_is_not_asked_to_wait(
    relay_env: RelayEnv,
) -> None:
    data = wire(relay_message(MARIE, message_id="<twice@crm.example>"))
    ex = await smtp_exchange(relay_env.port, [MARIE, MARIE], data)
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert len(relay_env.received_by(MARIE)) == 1
