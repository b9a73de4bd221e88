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
