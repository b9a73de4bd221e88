"""Inbound mail: mailto unsubscribe, RFC 3464 bounces, RFC 5965 complaints, review queue.

The tokens come from messages the library sent (SQLite file and PostgreSQL); nothing is mocked.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_web_support import ADDR, CAMPAIGN, Sent, is_blocked, make_mailer, make_optout, send_one

from prospect_mailer.addresses import normalise
from prospect_mailer.errors import InvalidMessageError
from prospect_mailer.inbound import handle_inbound, inbound_route, parse_report
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import MemoryTransport

HASH = normalise(ADDR).key_hash


def dsn(*recipients: tuple[str, str], encoding: str = "7bit") -> bytes:
    """A multipart/report delivery-status notification with (action, status) blocks."""
    blocks = "Reporting-MTA: dns; mx.radium.example\r\n"
    for action, status in recipients:
        blocks += (
            f"\r\nFinal-Recipient: rfc822; {ADDR}\r\nAction: {action}\r\nStatus: {status}\r\n"
            "Diagnostic-Code: smtp; 550 5.1.1 <marie.curie@radium.example> user unknown\r\n"
        )
    body = blocks.encode()
    if encoding == "base64":
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return (
        b"From: MAILER-DAEMON@mx.radium.example\r\n"
        b"To: bounce@bounces.acme.example\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Message-ID: <dsn-1@mx.radium.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        b"--B\r\nContent-Type: message/delivery-status\r\n"
        b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n" + body + b"\r\n"
        b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"Subject: Capteurs\r\nList-Unsubscribe: <https://x/unsubscribe/y>\r\n\r\n"
        b"--B--\r\n"
    )


def arf(feedback_type: str = "abuse") -> bytes:
    """An RFC 5965 feedback report."""
    return (
        b"From: fbl@isp.example\r\nTo: bounce@bounces.acme.example\r\nSubject: complaint\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
        b"--F\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        b"--F\r\nContent-Type: message/feedback-report\r\n\r\n"
        b"Feedback-Type: " + feedback_type.encode() + b"\r\nUser-Agent: isp-fbl/1.0\r\n"
        b"Version: 1\r\n\r\n"
        b"--F\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: ventes@acme.example\r\nSubject: Capteurs\r\n\r\nBonjour\r\n"
        b"--F--\r\n"
    )


AUTO_REPLY = (
    b"From: marie.curie@radium.example\r\nTo: bounce@bounces.acme.example\r\n"
    b"Subject: Absence du bureau\r\nAuto-Submitted: auto-replied\r\n\r\nJe suis absente.\r\n"
)


# -- routing and parsing (pure) -----------------------------------------------------------------


def test_route() -> None:
    assert inbound_route("unsubscribe+abc234@x.example") == ("unsubscribe", "abc234")
    assert inbound_route("<Bounce+ABC234@x.example>") == ("bounce", "ABC234")
    assert inbound_route("UNSUBSCRIBE+abc@x.example") == ("unsubscribe", "abc")
    for other in ("sales@x.example", "unsubscribe@x.example", "bounce+a b@x", "bounce+x@a@b"):
        assert inbound_route(other) is None
    assert inbound_route("bounce+abc189@x.example") is None  # not base32


@pytest.mark.parametrize(
    ("blocks", "kind"),
    [
        ((("failed", "5.1.1"),), "hard_bounce"),
        ((("delayed", "4.4.1"),), "soft_bounce"),
        ((("failed", "4.4.7"),), "soft_bounce"),  # gave up after retries: transient cause
        ((("delayed", "4.2.2"), ("failed", "5.2.1")), "hard_bounce"),
        ((("delivered", "2.0.0"),), "delivered"),
        ((("relayed", "2.0.0"),), "delivered"),
        ((("failed", "2.0.0"),), "review"),
        ((("exploded", "5.1.1"),), "review"),
        ((), "review"),
    ],
)
def test_dsn_classification(blocks: tuple[tuple[str, str], ...], kind: str) -> None:
    report = parse_report(dsn(*blocks))
    assert report.kind == kind, report
    assert report.facts["message_id"] == "<dsn-1@mx.radium.example>"


def test_dsn_base64_part_and_facts() -> None:
    report = parse_report(dsn(("failed", "5.1.1"), encoding="base64"))
    assert report.kind == "hard_bounce"
    assert report.facts["statuses"] == ["5.1.1"]
    assert report.facts["reporting_mta"] == "dns; mx.radium.example"


@pytest.mark.parametrize(
    ("feedback", "kind"),
    [("abuse", "complaint"), ("Abuse", "complaint"), ("not-spam", "ignored"), ("fraud", "review")],
)
def test_arf_classification(feedback: str, kind: str) -> None:
    assert parse_report(arf(feedback)).kind == kind


def test_not_a_report_goes_to_review() -> None:
    assert parse_report(AUTO_REPLY).kind == "review"
    assert parse_report(b"").kind == "review"
    no_dsn = dsn(("failed", "5.1.1")).replace(b"message/delivery-status", b"text/plain")
    assert parse_report(no_dsn).kind == "review"


def test_header_injection_is_refused() -> None:
    evil = b"Subject: =?utf-8?q?hi=0D=0ABcc:_victim@x.example?=\r\n" + arf()
    with pytest.raises(InvalidMessageError):
        parse_report(evil)


@given(st.binary(max_size=2000))
@example(b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n--x")
@example(b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n!!")
def test_parse_report_never_crashes(data: bytes) -> None:
    try:
        report = parse_report(data)
    except InvalidMessageError:
        return
    kinds = ("hard_bounce", "soft_bounce", "complaint", "delivered", "ignored", "review")
    assert report.kind in kinds


# -- against the store (SQLite file and PostgreSQL) ---------------------------------------------


async def test_mailto_unsubscribe_blocks_next_send(
    db: Store, sent: tuple[Sent, MemoryTransport]
) -> None:
    s, transport = sent
    optout = make_optout(db)
    result = await handle_inbound(optout, s.mailto, b"Subject: unsubscribe\r\n\r\n")
    assert (result.accepted, result.reply, result.kind) == (
        True,
        "250 2.0.0 unsubscribed",
        "unsubscribe",
    )
    assert result.send_id == s.outcome.send_id
    (hits,) = (await db.suppression.lookup([HASH])).values()
    assert [(h.scope, h.scope_value, h.reason, h.source) for h in hits] == [
        ("advertiser", "acme", "unsubscribe", "mailto")
    ]
    mailer = make_mailer(db, transport)
    assert await is_blocked(mailer, ADDR)
    await mailer.close()
    # Idempotent: a second mail (a client's retry) is a calm 250 and writes no second entry.
    again = await handle_inbound(optout, s.mailto.upper(), b"garbage \x00\xff")
    assert again.accepted
    assert await db.suppression.count() == 1


async def test_bad_tokens_change_nothing(db: Store, sent: tuple[Sent, MemoryTransport]) -> None:
    s, _ = sent
    optout = make_optout(db)
    local, domain = s.mailto.split("@")
    flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
    unknown_send = "unsubscribe+" + TokenSigner(["test-signing-key-0123456789abcdef"]).make_short(
        "ab" * 16
    )
    other_key = "unsubscribe+" + TokenSigner(["another-key-0123456789abcdef"]).make_short(
        s.outcome.send_id or ""
    )
    before = await db.audit.count()
    for rcpt in (
        f"{flipped}@{domain}",
        f"{local[:-3]}@{domain}",
        f"{unknown_send}@{domain}",
        f"{other_key}@{domain}",
        f"bounce+{flipped.partition('+')[2]}@{domain}",
    ):
        result = await handle_inbound(optout, rcpt, arf())
        assert (result.accepted, result.reply) == (False, "550 5.7.1 unknown token"), rcpt
    assert await db.suppression.count() == 0
    assert await db.audit.count() == before
    other = await handle_inbound(optout, "sales@acme.example", b"")
    assert (other.accepted, other.reply) == (False, "550 5.1.1 no such inbound address")


@pytest.mark.parametrize(
    ("data", "kind", "reason"),
    [(dsn(("failed", "5.1.1")), "hard_bounce", "hard_bounce"), (arf(), "complaint", "complaint")],
)
async def test_hard_bounce_and_complaint_suppress_globally(
    db: Store, sent: tuple[Sent, MemoryTransport], data: bytes, kind: str, reason: str
) -> None:
    s, transport = sent
    result = await handle_inbound(make_optout(db), s.verp, data)
    assert (result.accepted, result.kind, result.suppressed) == (True, kind, True)
    assert result.reply.startswith("250 2.0.0 ")
    (hits,) = (await db.suppression.lookup([HASH])).values()
    assert [(h.scope, h.reason) for h in hits] == [("global", reason)]
    (event,) = [
        e for e in await db.audit.events(send_id=s.outcome.send_id) if e.kind == "suppression"
    ]
    assert event.details["reason"] == reason
    assert "latency_ms" in event.details
    if kind == "hard_bounce":
        assert event.details["statuses"] == ["5.1.1"]
        assert "marie.curie@" not in str(event.details)  # the diagnostic is masked
    # Global: another advertiser's campaign is refused too.
    other = CAMPAIGN.model_copy(
        update={"id": "other", "advertiser": CAMPAIGN.advertiser.model_copy(update={"id": "beta"})}
    )
    mailer = make_mailer(db, transport)
    assert await is_blocked(mailer, ADDR, other)
    await mailer.close()
    assert (await db.audit.verify()).ok


async def test_soft_bounces_count_per_send_and_reset(db: Store) -> None:
    transport = MemoryTransport()
    mailer = make_mailer(db, transport)
    optout = make_optout(db, soft_bounce_limit=2)
    steps = [
        await send_one(mailer, transport, ADDR, CAMPAIGN.model_copy(update={"step": n}))
        for n in (1, 2, 3, 4)
    ]
    delayed = dsn(("delayed", "4.4.1"))
    r1 = await handle_inbound(optout, steps[0].verp, delayed)
    r1b = await handle_inbound(optout, steps[0].verp, delayed)  # same send again: counts once
    assert (r1.kind, r1.suppressed, r1b.suppressed) == ("soft_bounce", False, False)
    assert r1b.reply == "250 2.0.0 soft bounce 1/2 counted"
    # A delivery report resets the run.
    reset = await handle_inbound(optout, steps[1].verp, dsn(("delivered", "2.0.0")))
    assert (reset.accepted, reset.kind) == (True, "ignored")
    r3 = await handle_inbound(optout, steps[2].verp, dsn(("failed", "4.4.7")))
    assert r3.reply == "250 2.0.0 soft bounce 1/2 counted"
    assert await db.suppression.count() == 0
    r4 = await handle_inbound(optout, steps[3].verp, delayed)
    assert (r4.reply, r4.suppressed) == (
        "250 2.0.0 soft bounce 2/2 counted, address suppressed",
        True,
    )
    (hits,) = (await db.suppression.lookup([HASH])).values()
    assert [(h.scope, h.reason, h.source) for h in hits] == [("global", "hard_bounce", "bounce")]
    assert await is_blocked(mailer, ADDR)
    await mailer.close()


async def test_unparsed_mail_goes_to_review(db: Store, sent: tuple[Sent, MemoryTransport]) -> None:
    s, _ = sent
    result = await handle_inbound(make_optout(db), s.verp, AUTO_REPLY)
    assert (result.accepted, result.reply, result.kind) == (
        True,
        "250 2.0.0 queued for review",
        "review",
    )
    (event,) = await db.audit.events(status="review")
    assert (event.kind, event.send_id) == ("inbound", s.outcome.send_id)
    assert event.details["reason"] == "not a delivery status or feedback report"
    assert await db.suppression.count() == 0


async def test_unsafe_headers_refused(db: Store, sent: tuple[Sent, MemoryTransport]) -> None:
    s, _ = sent
    before = await db.audit.count()
    evil = b"Subject: =?utf-8?q?x=0D=0ABcc:_a@b.example?=\r\n" + dsn(("failed", "5.1.1"))
    result = await handle_inbound(make_optout(db), s.verp, evil)
    assert (result.accepted, result.reply) == (False, "550 5.6.0 message headers refused")
    assert await db.suppression.count() == 0
    assert await db.audit.count() == before


async def test_store_failure_is_a_temporary_reply(db_url: str) -> None:
    async with Store.connect(db_url) as store:
        transport = MemoryTransport()
        mailer = make_mailer(store, transport)
        s = await send_one(mailer, transport, ADDR)
        await mailer.close()
        optout = make_optout(store)
    # The store is closed now: every call fails, and the sender must keep the message.
    for rcpt, data in ((s.mailto, b""), (s.verp, arf()), (s.verp, AUTO_REPLY)):
        result = await handle_inbound(optout, rcpt, data)
        assert (result.accepted, result.reply) == (
            False,
            "451 4.3.0 temporary failure, try again later",
        )
