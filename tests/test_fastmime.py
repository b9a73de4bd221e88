"""The fast path writes the same message the compliance step would make of the same content."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage

import pytest
from factories import FOOTER_MAILTO, FOOTER_URL, footer_context
from hypothesis import given
from hypothesis import strategies as st

from prospect_mailer.compliance import FooterRenderer, apply_compliance
from prospect_mailer.errors import InvalidMessageError
from prospect_mailer.fastmime import compose_bytes

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
URL, MAILTO = FOOTER_URL, FOOTER_MAILTO
RENDERER = FooterRenderer()
FOOTERS = RENDERER.render(footer_context(recipient_name="Zoé"))


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def fast(text: str | None, html: str | None, *, subject: str = "Objet", name: str = "Zoé") -> bytes:
    return compose_bytes(
        from_name="ACME Ventes",
        from_address="ventes@acme.example",
        to_name=name,
        to_address="zoe@x.example",
        subject=subject,
        reply_to=None,
        message_id="<abc@acme.example>",
        now=NOW,
        text=text,
        html=html,
        footers=FOOTERS,
        list_unsubscribe_url=URL,
        list_unsubscribe_mailto=MAILTO,
    )


def slow(
    text: str | None, html: str | None, *, subject: str = "Objet", name: str = "Zoé"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = Address(display_name="ACME Ventes", addr_spec="ventes@acme.example")
    msg["To"] = Address(display_name=name, addr_spec="zoe@x.example")
    msg["Subject"] = subject
    msg["Message-ID"] = "<abc@acme.example>"
    if text is not None:
        msg.set_content(text, charset="utf-8", cte="quoted-printable")
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    else:
        assert html is not None
        msg.set_content(html, subtype="html", charset="utf-8", cte="quoted-printable")
    out = apply_compliance(
        msg,
        FOOTERS,
        list_unsubscribe_url=URL,
        list_unsubscribe_mailto=MAILTO,
        message_id_domain="acme.example",
        now=NOW,
    )
    return parse(out.as_bytes(policy=out.policy.clone(linesep="\r\n")))


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def same(a: EmailMessage, b: EmailMessage) -> None:
    for header in ("From", "Subject", "Message-ID", "Date", "List-Unsubscribe",
                   "List-Unsubscribe-Post"):  # fmt: skip
        assert str(a[header]) == str(b[header]), header
    (ta,), (tb,) = a["To"].addresses, b["To"].addresses
    # White space inside a display name may differ: the stdlib writer (the slow side) even
    # inserts a space where it folds a long run of encoded words.
    assert (squash(ta.display_name), ta.addr_spec) == (squash(tb.display_name), tb.addr_spec)
    for kind in ("plain", "html"):
        pa, pb = a.get_body((kind,)), b.get_body((kind,))
        assert (pa is None) == (pb is None)
        if pa is not None and pb is not None:
            # set_content() (the slow side) adds newlines at the end of a body; beyond
            # white space, nothing may differ
            assert squash(pa.get_content()) == squash(pb.get_content()), kind
            assert pa.get_content_charset() == "utf-8"


@pytest.mark.parametrize(
    ("text", "html"),
    [
        ("Bonjour,\nNos capteurs.\n", "<html><body><p>Bonjour</p></body></html>"),
        ("Sans fin de ligne", None),
        (None, "<p>pas de body</p>"),
        (None, "<HTML><BODY>a</BODY></HTML>"),
        ("ligne avec espace final \nfin", "<body>x</body>"),
        ("=ég@l € " * 40, "<body>" + "très long " * 200 + "</body>"),
    ],
)
def test_fast_path_matches_compliance_step(text: str | None, html: str | None) -> None:
    same(parse(fast(text, html)), slow(text, html))


def test_headers_and_footers_present() -> None:
    data = fast("Bonjour", "<body>Bonjour</body>", subject="Capteurs connectés n°1 " * 6)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in head + b"\r\n"
    assert f"List-Unsubscribe: <{URL}>, <{MAILTO}>".encode() in head
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    msg = parse(data)
    assert "Capteurs connectés" in str(msg["Subject"])
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert text is not None
    assert html is not None
    assert URL in text.get_content()
    assert "Dupont &amp; Fils &lt;SARL&gt;" in html.get_content()


@pytest.mark.parametrize("bad", ["a\r\nBcc: x@y.example", "a\nb", "a\x00"])
def test_line_breaks_in_headers_refused(bad: str) -> None:
    with pytest.raises(InvalidMessageError):
        fast("x", None, subject=bad)
    with pytest.raises(InvalidMessageError):
        fast("x", None, name=bad)


body_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=300
)


@given(text=body_text, html=body_text, subject=st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=120),
    name=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40),
)  # fmt: skip
def test_property_fast_equals_slow(text: str, html: str, subject: str, name: str) -> None:
    html_doc = f"<html><body>{html}</body></html>"
    name = name.strip()  # as the Prospect model stores it
    subject = subject.strip() or "x"  # as the Campaign model stores it (never empty)
    same(parse(fast(text, html_doc, subject=subject, name=name)),
         slow(text, html_doc, subject=subject, name=name))  # fmt: skip
