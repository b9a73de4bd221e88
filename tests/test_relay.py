"""End to end: a real SMTP client -> the relay on 127.0.0.1 -> a real aiosmtpd sink upstream.

Store-backed: every test runs on SQLite and, when configured, PostgreSQL (``db_url``).
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from relay_fixtures import (
    MARIE,
    PAUL,
    PDF,
    PRIVATE,
    SENDER,
    SUPPRESSED,
    UNKNOWN,
    MakeRelayEnv,
    RelayEnv,
    relay_message,
    smtp_exchange,
    wire,
)

from prospect_mailer import policy
from prospect_mailer.compliance import LIST_UNSUBSCRIBE_POST, TEXT_FOOTER_SEPARATOR
from prospect_mailer.models import Prospect


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def raw_part(data: bytes, marker: bytes) -> bytes:
    """The raw bytes of the MIME part holding ``marker`` (between two boundary lines)."""
    at = data.index(marker)
    start = data.rindex(b"\r\n--", 0, at)
    end = data.index(b"\r\n--", at)
    return data[start:end]


async def test_delivers_one_copy_per_recipient_with_footers_and_intact_attachment(
    relay_env: RelayEnv,
) -> None:
    msg = relay_message(MARIE, PAUL)
    sent = wire(msg)
    ex = await smtp_exchange(relay_env.port, [MARIE, PAUL], sent)
    assert ex.rcpt[MARIE][0] == 250
    assert ex.rcpt[PAUL][0] == 250
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert len(relay_env.sink.messages) == 2  # one upstream message per recipient
    for rcpt in (MARIE, PAUL):
        (data,) = relay_env.received_by(rcpt)
        got = parse(data)
        assert got["Message-ID"] == "<m1@crm.example>"
        assert got["X-Mailer"] == "ExampleCRM 7.2"  # other headers kept
        assert not [k for k in got if k.lower().startswith("x-prospect-")]
        assert got["List-Unsubscribe-Post"] == LIST_UNSUBSCRIBE_POST
        assert "https://optout.acme.example/unsubscribe/" in got["List-Unsubscribe"]
        text = got.get_body(("plain",))
        html = got.get_body(("html",))
        assert text is not None
        assert html is not None
        assert TEXT_FOOTER_SEPARATOR in text.get_content()
        assert "ACME SAS" in text.get_content()
        assert "ACME SAS" in html.get_content()
        (attachment,) = list(got.iter_attachments())
        assert attachment.get_payload(decode=True) == PDF
        # Byte-identical on the wire too: the attachment part was not re-encoded.
        assert raw_part(data, b"offre.pdf") == raw_part(sent, b"offre.pdf")
    # Each copy carries its own unsubscribe link.
    links = {parse(m.data)["List-Unsubscribe"] for m in relay_env.sink.messages}
    assert len(links) == 2
    records = await relay_env.store.audit.events(campaign_id="spring")
    sent_records = [r for r in records if r.status == "sent"]
    assert len(sent_records) == 2
    assert all(r.transport == "relay" for r in sent_records)


async def test_suppressed_and_unknown_recipients_get_550_at_rcpt(relay_env: RelayEnv) -> None:
    # Bound at MAIL FROM through the sender mapping, so every rule runs at RCPT.
    env = relay_env
    ex = await smtp_exchange(
        env.port, [MARIE, SUPPRESSED, UNKNOWN, PRIVATE], None, sender="crm@acme.example"
    )
    assert ex.rcpt[MARIE][0] == 250
    assert ex.rcpt[UNKNOWN][0] == 550
    assert ex.rcpt[UNKNOWN][1].startswith("5.7.1 RELAY_UNKNOWN_RECIPIENT")
    assert "origin of the data is unknown" in ex.rcpt[UNKNOWN][1]
    # Without a campaign binding at MAIL FROM only the registry can be checked at RCPT.
    assert ex.rcpt[SUPPRESSED][0] == 250


async def test_sender_mapping_runs_every_rule_at_rcpt(make_relay_env: MakeRelayEnv) -> None:
    env = await make_relay_env(sender_campaigns={"CRM@acme.example": "spring"})
    ex = await smtp_exchange(
        env.port, [MARIE, SUPPRESSED, UNKNOWN, PRIVATE], None, sender="crm@acme.example"
    )
    assert ex.rcpt[MARIE][0] == 250
    assert ex.rcpt[SUPPRESSED][0] == 550
    assert ex.rcpt[SUPPRESSED][1].startswith("5.7.1 SUPP_CHECK_AT_SEND")
    assert ex.rcpt[PRIVATE][0] == 550
    assert "FR_B2C_CONSENT_REQUIRED" in ex.rcpt[PRIVATE][1]
    assert ex.rcpt[UNKNOWN][0] == 550
    blocked = [r for r in await env.store.audit.events(status="blocked") if r.transport == "relay"]
    assert {r.rule_ids for r in blocked} >= {
        ("RELAY_UNKNOWN_RECIPIENT",),
        ("SUPP_CHECK_AT_SEND",),
    }


async def test_mixed_message_delivers_allowed_and_sends_a_dsn(relay_env: RelayEnv) -> None:
    # Bound by header only: the rules run at DATA; the blocked recipient is reported by DSN.
    msg = relay_message(MARIE, PRIVATE, SUPPRESSED)
    ex = await smtp_exchange(relay_env.port, [MARIE, PRIVATE, SUPPRESSED], wire(msg))
    assert ex.data is not None
    assert ex.data[0] == 250, ex.data
    assert "DSN" in ex.data[1]
    assert len(relay_env.received_by(MARIE)) == 1
    assert not relay_env.received_by(PRIVATE)
    assert not relay_env.received_by(SUPPRESSED)
    (dsn_msg,) = relay_env.received_by(SENDER)
    dsn = parse(dsn_msg)
    assert relay_env.sink.messages[-1].mail_from == "<>"  # a DSN never causes a DSN
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    recipients = {str(b["Final-Recipient"]): b for b in blocks[1:]}
    assert set(recipients) == {f"rfc822; {PRIVATE}", f"rfc822; {SUPPRESSED}"}
    assert "FR_B2C_CONSENT_REQUIRED" in str(recipients[f"rfc822; {PRIVATE}"]["Diagnostic-Code"])
    assert all(str(b["Status"]) == "5.7.1" and str(b["Action"]) == "failed" for b in blocks[1:])


async def test_every_recipient_blocked_at_data_rejects_the_message(relay_env: RelayEnv) -> None:
    msg = relay_message(PRIVATE, SUPPRESSED)
    ex = await smtp_exchange(relay_env.port, [PRIVATE, SUPPRESSED], wire(msg))
    assert ex.data is not None
    assert ex.data[0] == 550
    assert ex.data[1].startswith("5.7.1 every recipient blocked")
    assert relay_env.sink.messages == []  # no delivery, no DSN: the client got the refusal


async def test_retry_of_a_delivered_message_is_250_and_delivers_nothing_twice(
    relay_env: RelayEnv,
) -> None:
    data = wire(relay_message(MARIE, PAUL))
    for _ in range(2):
        ex = await smtp_exchange(relay_env.port, [MARIE, PAUL], data)
        assert ex.data is not None
        assert ex.data[0] == 250
    assert "2 delivered (2 by an earlier attempt)" in ex.data[1]
    assert len(relay_env.sink.messages) == 2


async def test_message_without_message_id_gets_a_stable_one(relay_env: RelayEnv) -> None:
    data = wire(relay_message(MARIE, message_id=None))
    for _ in range(2):
        ex = await smtp_exchange(relay_env.port, [MARIE], data)
        assert ex.data is not None
        assert ex.data[0] == 250
    (got,) = relay_env.received_by(MARIE)  # the retry was recognised: same derived key
    assert re.fullmatch(r"<[0-9a-f]{32}@relay\.test>", str(parse(got)["Message-ID"]))
    added = await relay_env.store.audit.events(status="message-id-added")
    assert len(added) == 2


async def test_an_empty_message_id_is_replaced_by_the_stable_one(relay_env: RelayEnv) -> None:
    data = wire(relay_message(MARIE, message_id=None)).replace(
        b"Subject:", b"Message-ID: \r\nSubject:", 1
    )
    for _ in range(2):
        ex = await smtp_exchange(relay_env.port, [MARIE], data)
        assert ex.data is not None
        assert ex.data[0] == 250, ex.data
    (got,) = relay_env.received_by(MARIE)  # sent once, under the key it was recorded with
    ids = parse(got).get_all("Message-ID")
    assert len(ids) == 1
    assert re.fullmatch(r"<[0-9a-f]{32}@relay\.test>", str(ids[0]))
    (claim,) = [e for e in await relay_env.store.audit.events(status="sent")]
    assert claim.message_id == str(ids[0])


async def test_unknown_or_missing_campaign_is_refused(relay_env: RelayEnv) -> None:
    ex = await smtp_exchange(relay_env.port, [MARIE], wire(relay_message(MARIE, campaign=None)))
    assert ex.data is not None
    assert ex.data[0] == 550
    assert "RELAY_NO_CAMPAIGN" in ex.data[1]
    ex = await smtp_exchange(relay_env.port, [MARIE], wire(relay_message(MARIE, campaign="nope")))
    assert ex.data is not None
    assert ex.data[0] == 550
    assert "RELAY_UNKNOWN_CAMPAIGN" in ex.data[1]
    assert relay_env.sink.messages == []


async def test_header_injection_is_refused_with_554(relay_env: RelayEnv) -> None:
    # CVE-2024-6923: an encoded word that decodes to CR/LF would become a real header.
    msg = wire(relay_message(MARIE)).replace(
        b"Subject: ", b"Subject: =?utf-8?q?hi=0D=0ABcc:_victim@example.com?= ", 1
    )
    ex = await smtp_exchange(relay_env.port, [MARIE], msg)
    assert ex.data is not None
    assert ex.data[0] == 554
    assert ex.data[1].startswith("5.6.0")
    assert relay_env.sink.messages == []


async def test_rules_run_once_per_recipient_unless_something_changed_before_data(
    make_relay_env: MakeRelayEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision made at RCPT serves the send at DATA when the facts read again there are
    the same; an objection recorded between the two blocks the send (the facts differ)."""
    calls: list[str] = []
    decide = policy.decide

    def counting(prospect: Prospect, *args: Any) -> Any:
        calls.append(prospect.email)
        return decide(prospect, *args)

    monkeypatch.setattr(policy, "decide", counting)
    env = await make_relay_env(sender_campaigns={SENDER: "spring"})
    ex = await smtp_exchange(env.port, [MARIE], wire(relay_message(MARIE, message_id="<m2@x>")))
    assert ex.data is not None
    assert ex.data[0] == 250
    assert calls == [MARIE]  # at RCPT; DATA found the same facts
    assert len(env.received_by(MARIE)) == 1

    calls.clear()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=env.port, timeout=10)
    await client.connect()
    try:
        await client.mail(SENDER)
        code, _ = await client.rcpt(PAUL)
        assert code == 250
        await env.store.suppression.add_address(
            PAUL, scope="global", scope_value="", reason="unsubscribe", source="test"
        )
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(wire(relay_message(PAUL, message_id="<m3@x>")))
    finally:
        client.close()
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1 SUPP_CHECK_AT_SEND")
    assert calls == [PAUL, PAUL]  # decided again at DATA, on the new facts
    assert env.received_by(PAUL) == []
