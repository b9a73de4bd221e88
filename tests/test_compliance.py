"""Tests for prospect_mailer.compliance (footers, List-Unsubscribe headers, header safety)."""

from __future__ import annotations

import base64
import copy
import html as html_lib
import itertools
import re
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from email import base64mime, policy, quoprimime
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from prospect_mailer.compliance import (
    HTML_FOOTER_CLASS,
    HTML_OBJECTION_CLASS,
    HTML_OPTOUT_CLASS,
    HTML_ORIGIN_CLASS,
    FooterContext,
    FooterRenderer,
    RenderedFooters,
    apply_compliance,
    build_list_unsubscribe,
    check_headers_safe,
    format_date,
)
from prospect_mailer.errors import ConfigError, InvalidMessageError
from prospect_mailer.mime import OUTPUT_POLICY, CommaFoldedHeader

RENDERER = FooterRenderer()
URL = "https://unsub.example.com/u/v1.tok-123"
MAILTO = "mailto:unsubscribe+tok-123@example.com"
NOW = datetime(2024, 5, 2, 9, 30, tzinfo=UTC)
HEADERS = b"From: Ventes <ventes@example.com>\nTo: prospect@example.org\nSubject: Offre\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
PDF = b"%PDF-1.4\n" + bytes(reversed(range(256))) * 2 + b"\r\n%%EOF"


def make_ctx(**changes: object) -> FooterContext:
    ctx = FooterContext(
        locale="fr",
        advertiser_legal_name="Dupont & Fils",
        advertiser_postal_address="12 rue de la Paix\n75002 Paris",
        advertiser_contact="dpo@dupont.example",
        unsubscribe_url=URL,
        unsubscribe_mailto=MAILTO,
        source_name="Salon Pro Events",
        source_type="partner",
        collection_method="formulaire d'inscription",
        collected_at=date(2024, 3, 12),
        first_contact=True,
        campaign_id="spring-2024",
    )
    return replace(ctx, **changes)  # type: ignore[arg-type]


FOOTERS = RENDERER.render(make_ctx())


def apply(
    message: EmailMessage | bytes,
    footers: RenderedFooters = FOOTERS,
    *,
    url: str = URL,
    mailto: str | None = MAILTO,
    now: datetime = NOW,
) -> EmailMessage:
    return apply_compliance(
        message,
        footers,
        list_unsubscribe_url=url,
        list_unsubscribe_mailto=mailto,
        message_id_domain="mail.example.com",
        now=now,
    )


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def roundtrip(msg: EmailMessage) -> EmailMessage:
    return parse(msg.as_bytes())


def leaves(msg: EmailMessage) -> list[EmailMessage]:
    """Leaf parts in order, not descending into attached messages."""
    if msg.get_content_maintype() != "multipart":
        return [msg]
    out: list[EmailMessage] = []
    for child in msg.iter_parts():
        assert isinstance(child, EmailMessage)
        out += leaves(child)
    return out


def expected_html(part: EmailMessage, footers: RenderedFooters = FOOTERS) -> str:
    charset = part.get_content_charset("us-ascii")
    return footers.html.encode(charset, "xmlcharrefreplace").decode(charset)


def content(part: EmailMessage) -> str:
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def is_footed(part: EmailMessage, footers: RenderedFooters = FOOTERS) -> bool:
    if part.get_content_subtype() == "html":
        return expected_html(part, footers) in content(part)
    return footers.text in content(part)


def header_block(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[0] + b"\n"


_boundaries = itertools.count()


def leaf(ctype: str, body: bytes, *, cte: str | None = "7bit", extra: str = "") -> bytes:
    head = f"Content-Type: {ctype}\n"
    if cte is not None:
        head += f"Content-Transfer-Encoding: {cte}\n"
    return (head + extra + "\n").encode() + body


def multipart(subtype: str, *parts: bytes) -> bytes:
    b = f"=_pm_test_{next(_boundaries)}_="
    out = f'Content-Type: multipart/{subtype}; boundary="{b}"\n\n'.encode()
    for p in parts:
        out += f"--{b}\n".encode() + p + b"\n"
    return out + f"--{b}--\n".encode()


def encode_body(text: str, charset: str, cte: str) -> bytes:
    data = text.encode(charset)
    if cte == "base64":
        return base64mime.body_encode(data, 76, "\n").encode()
    if cte == "quoted-printable":
        return quoprimime.body_encode(data.decode("latin-1"), 76, "\n").encode()
    return data


def text_leaf(sub: str, text: str, charset: str, cte: str, extra: str = "") -> bytes:
    ctype = f'text/{sub}; charset="{charset}"'
    return leaf(ctype, encode_body(text, charset, cte), cte=cte, extra=extra)


def attachment(ctype: str, data: bytes, name: str, disposition: str = "attachment") -> bytes:
    extra = f'Content-Disposition: {disposition}; filename="{name}"\n'
    return leaf(ctype, base64mime.body_encode(data, 76, "\n").encode(), cte="base64", extra=extra)


def api_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Ventes <ventes@example.com>"
    msg["To"] = "prospect@example.org"
    msg["Subject"] = "Offre de printemps"
    msg.set_content("Bonjour,\n\nVoici notre offre.\n")
    msg.add_alternative(
        "<html><body><p>Bonjour,</p><p>Voici notre offre.</p></body></html>\n", subtype="html"
    )
    return msg


# --- MIME shapes -------------------------------------------------------------------------


def test_alternative_both_parts_footed_and_footer_before_body_end() -> None:
    out = roundtrip(apply(api_message()))
    plain, html = leaves(out)
    assert is_footed(plain)
    assert is_footed(html)
    assert content(plain).startswith("Bonjour,\n\nVoici notre offre.\n\n-- \n")
    body = content(html)
    assert body.index(expected_html(html)) < body.index("</body>")
    assert body.endswith("</body></html>\n")


def test_mixed_with_binary_attachment_keeps_attachment_bytes() -> None:
    msg = api_message()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="offre.pdf")
    original = msg.as_bytes()
    att_before = leaves(parse(original))[2]
    out = apply(msg)
    assert msg.as_bytes() == original  # caller's object untouched
    att_after = leaves(roundtrip(out))[2]
    assert att_after.get_payload(decode=True) == PDF
    assert att_after.as_bytes(policy=OUTPUT_POLICY) == att_before.as_bytes(policy=OUTPUT_POLICY)
    assert [is_footed(p) for p in leaves(roundtrip(out))[:2]] == [True, True]


def test_related_with_inline_image() -> None:
    img = attachment("image/png", PNG, "logo.png", "inline") + b""
    img = img.replace(
        b"Content-Disposition", b"Content-ID: <logo@example.com>\nContent-Disposition"
    )
    html = text_leaf(
        "html",
        '<html><body><img src="cid:logo@example.com"></body></html>\n',
        "utf-8",
        "quoted-printable",
    )
    raw = HEADERS + multipart("related", html, img)
    out = apply(raw)
    data = out.as_bytes()
    assert img in data
    html_part, img_part = leaves(roundtrip(out))
    assert is_footed(html_part)
    assert img_part.get_payload(decode=True) == PNG


def test_html_only_message() -> None:
    raw = HEADERS + text_leaf("html", "<p>Bonjour</p>\n", "utf-8", "8bit")
    out = roundtrip(apply(raw))
    assert is_footed(out)
    assert content(out).startswith("<p>Bonjour</p>\n<div class=")  # no </body>: appended
    assert out["Content-Transfer-Encoding"] == "8bit"


def test_text_only_message() -> None:
    raw = HEADERS + text_leaf("plain", "Bonjour.", "utf-8", "8bit")
    out = roundtrip(apply(raw))
    assert content(out) == "Bonjour.\n\n" + FOOTERS.text


def test_nested_mixed_alternative_related_pdf() -> None:
    text = text_leaf("plain", "Bonjour\n", "utf-8", "quoted-printable")
    html = text_leaf("html", "<html><body><img src=cid:i></body></html>", "utf-8", "base64")
    img = attachment("image/png", PNG, "i.png", "inline")
    pdf = attachment("application/pdf", PDF, "offre.pdf")
    raw = HEADERS + multipart(
        "mixed", multipart("alternative", text, multipart("related", html, img)), pdf
    )
    out = apply(raw)
    data = out.as_bytes()
    assert img in data
    assert pdf in data
    parts = leaves(roundtrip(out))
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    assert is_footed(parts[0])
    assert is_footed(parts[1])
    assert parts[1]["Content-Transfer-Encoding"] == "base64"


def test_text_attachment_untouched_but_inline_text_footed() -> None:
    notes = leaf(
        'text/plain; charset="utf-8"',
        b"notes\n",
        extra=('Content-Disposition: attachment; filename="notes.txt"\n'),
    )
    inline = leaf(
        'text/plain; charset="utf-8"',
        b"inline\n",
        cte="8bit",
        extra=('Content-Disposition: inline; filename="inline.txt"\n'),
    )
    raw = HEADERS + multipart(
        "mixed", text_leaf("plain", "Corps\n", "utf-8", "8bit"), notes, inline
    )
    out = apply(raw)
    assert notes in out.as_bytes()
    body, att, inl = leaves(roundtrip(out))
    assert is_footed(body)
    assert is_footed(inl)
    assert not is_footed(att)


def test_attached_message_is_not_footed() -> None:
    inner = HEADERS + text_leaf("plain", "message transféré\n", "utf-8", "8bit")
    fwd = b"Content-Type: message/rfc822\n\n" + inner
    raw = HEADERS + multipart("mixed", text_leaf("plain", "Voir ci-joint\n", "utf-8", "8bit"), fwd)
    out = apply(raw)
    assert inner in out.as_bytes()
    assert out.as_bytes().count(b"\n-- \n") == 1


def test_message_without_text_part_refused() -> None:
    raw = HEADERS + multipart("mixed", attachment("application/pdf", PDF, "a.pdf"))
    with pytest.raises(InvalidMessageError, match="text/plain or text/html"):
        apply(raw)


def test_signed_message_refused() -> None:
    raw = HEADERS + multipart(
        "signed",
        text_leaf("plain", "x\n", "utf-8", "8bit"),
        attachment("application/pgp-signature", b"sig", "s.asc"),
    )
    with pytest.raises(InvalidMessageError, match="multipart/signed"):
        apply(raw)


# --- charsets and transfer encodings ---------------------------------------------------------


def test_latin1_quoted_printable_kept() -> None:
    raw = HEADERS + text_leaf("plain", "Déjà vu, très cher.\n", "iso-8859-1", "quoted-printable")
    out = apply(raw)
    assert out.get_content_charset() == "iso-8859-1"
    assert out["Content-Transfer-Encoding"] == "quoted-printable"
    body = out.as_bytes().split(b"\n\n", 1)[1]
    assert b"donn=E9es" in body  # "données" in latin-1, not utf-8
    assert content(roundtrip(out)) == "Déjà vu, très cher.\n\n" + FOOTERS.text


def test_utf8_base64_kept() -> None:
    raw = HEADERS + text_leaf("plain", "Ça marche ✓\n", "utf-8", "base64")
    out = roundtrip(apply(raw))
    assert out["Content-Transfer-Encoding"] == "base64"
    assert out.get_content_charset() == "utf-8"
    assert content(out) == "Ça marche ✓\n\n" + FOOTERS.text


def test_us_ascii_7bit_text_becomes_utf8_quoted_printable() -> None:
    raw = HEADERS + text_leaf("plain", "Hello\n", "us-ascii", "7bit")
    out = roundtrip(apply(raw))
    assert out.get_content_charset() == "utf-8"
    assert out["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(out) == "Hello\n\n" + FOOTERS.text


def test_us_ascii_7bit_html_keeps_charset_with_character_references() -> None:
    page = '<html><head><meta charset="us-ascii"></head><body>Hi</body></html>'
    raw = HEADERS + text_leaf("html", page, "us-ascii", "7bit")
    out = roundtrip(apply(raw))
    assert out.get_content_charset() == "us-ascii"
    assert out["Content-Transfer-Encoding"] == "7bit"
    assert "donn&#233;es" in content(out)
    assert html_lib.unescape(FOOTERS.html) in html_lib.unescape(content(out))


def test_us_ascii_7bit_ascii_footer_stays_7bit() -> None:
    ascii_footers = RENDERER.render(make_ctx(locale="en", collection_method="web form"))
    assert ascii_footers.text.isascii()
    raw = HEADERS + text_leaf("plain", "Hello\n", "us-ascii", "7bit")
    out = roundtrip(apply(raw, ascii_footers))
    assert out.get_content_charset() == "us-ascii"
    assert out.get("Content-Transfer-Encoding") == "7bit"
    assert is_footed(out, ascii_footers)


def test_windows_1252_8bit_kept() -> None:
    raw = HEADERS + text_leaf("plain", "Prix : 10 € \u2013 offre\n", "windows-1252", "8bit")
    out = apply(raw)
    assert out.get_content_charset() == "windows-1252"
    assert out["Content-Transfer-Encoding"] == "8bit"
    body = out.as_bytes().split(b"\n\n", 1)[1]
    assert b"10 \x80 \x96 offre" in body
    assert "données".encode("cp1252") in body
    assert content(roundtrip(out)) == "Prix : 10 € \u2013 offre\n\n" + FOOTERS.text


def test_footer_outside_charset_reencodes_text_keeps_html_charset() -> None:
    footers = RENDERER.render(make_ctx(advertiser_legal_name="Łódź Café € Sp. z o.o."))
    text = text_leaf("plain", "Prix : 10 €\n", "windows-1252", "8bit")
    page = text_leaf("html", "<body>Prix : 10 €</body>", "windows-1252", "base64")
    out = roundtrip(apply(HEADERS + multipart("alternative", text, page), footers))
    plain, html = leaves(out)
    assert plain.get_content_charset() == "utf-8"
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(plain) == "Prix : 10 €\n\n" + footers.text
    assert html.get_content_charset() == "windows-1252"
    assert html["Content-Transfer-Encoding"] == "base64"
    assert "&#321;ód&#378; Café €" in content(html)
    assert is_footed(html, footers)


def test_crlf_body_gets_crlf_footer() -> None:
    raw = (HEADERS + text_leaf("plain", "a\r\nb\r\n", "utf-8", "base64")).replace(b"\n", b"\r\n")
    out = roundtrip(apply(raw))
    decoded = out.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded == ("a\r\nb\r\n\r\n" + FOOTERS.text.replace("\n", "\r\n")).encode()


def test_unknown_charset_refused() -> None:
    raw = HEADERS + text_leaf("plain", "x\n", "utf-8", "8bit").replace(b"utf-8", b"x-klingon")
    with pytest.raises(InvalidMessageError, match="x-klingon"):
        apply(raw)


# --- HTML placement ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("<html><body>A</body></html>", "<html><body>A{F}</body></html>"),
        ("<HTML><BODY>A</BODY></HTML>", "<HTML><BODY>A{F}</BODY></HTML>"),
        ("<body>A</body >x</body>y", "<body>A</body >x{F}</body>y"),
        ("<html>A</html>", "<html>A{F}</html>"),
        ("<p>A</p>", "<p>A</p>{F}"),
        ("", "{F}"),
    ],
)
def test_html_footer_position(page: str, expected: str) -> None:
    out = roundtrip(apply(HEADERS + text_leaf("html", page, "utf-8", "quoted-printable")))
    assert content(out) == expected.replace("{F}", FOOTERS.html)


# --- headers -----------------------------------------------------------------------------------


def test_list_unsubscribe_headers_exact_bytes() -> None:
    data = apply(api_message()).as_bytes()
    head = header_block(data)
    assert f"\nList-Unsubscribe: <{URL}>, <{MAILTO}>\n".encode() in head
    assert b"\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n" in head
    assert head.lower().count(b"\nlist-unsubscribe:") == 1
    assert head.lower().count(b"\nlist-unsubscribe-post:") == 1


def test_caller_list_unsubscribe_replaced_by_exactly_one() -> None:
    msg = api_message()
    msg["List-Unsubscribe"] = "<http://old.example.com/u>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=Maybe"
    head = header_block(apply(msg).as_bytes())
    assert head.lower().count(b"\nlist-unsubscribe:") == 1
    assert head.lower().count(b"\nlist-unsubscribe-post:") == 1
    assert b"old.example.com" not in head
    assert b"Maybe" not in head
    assert msg["List-Unsubscribe"] == "<http://old.example.com/u>"  # caller's copy kept


def test_two_list_unsubscribe_fields_refused() -> None:
    raw = (
        HEADERS + b"List-Unsubscribe: <https://a.example>\nList-Unsubscribe: <https://b.example>\n"
    )
    with pytest.raises(InvalidMessageError, match="several List-Unsubscribe"):
        apply(raw + text_leaf("plain", "x\n", "utf-8", "8bit"))


def test_long_url_stays_on_one_line_under_any_policy() -> None:
    url = "https://unsub.example.com/u/" + "A1b2-C3d4_" * 20
    assert len(url) > 200
    out = apply(api_message(), url=url)
    expected = f"\nList-Unsubscribe: <{url}>, <{MAILTO}>\n".encode()
    assert expected in out.as_bytes()
    # aiosmtplib flattens with policy.SMTP, whose refolding would turn the URL into encoded-words
    assert expected.replace(b"\n", b"\r\n") in out.as_bytes(policy=policy.SMTP)
    assert roundtrip(out)["List-Unsubscribe"] == f"<{url}>, <{MAILTO}>"


def test_very_long_url_folds_only_after_comma() -> None:
    url = "https://unsub.example.com/u/" + "x" * 935
    out = apply(api_message(), url=url)
    expected = f"\nList-Unsubscribe: <{url}>,\n <{MAILTO}>\n".encode()
    assert expected in out.as_bytes()
    assert expected.replace(b"\n", b"\r\n") in out.as_bytes(policy=policy.SMTP)
    assert roundtrip(out)["List-Unsubscribe"] == f"<{url}>, <{MAILTO}>"


def test_list_unsubscribe_survives_copy() -> None:
    out = apply(api_message())
    value = out["List-Unsubscribe"]
    assert isinstance(value, CommaFoldedHeader)
    for clone in (copy.copy(value), copy.deepcopy(value)):
        assert isinstance(clone, CommaFoldedHeader)
        assert (clone.name, str(clone)) == (value.name, str(value))
    assert copy.deepcopy(out).as_bytes() == out.as_bytes()


def test_item_longer_than_998_refused() -> None:
    with pytest.raises(InvalidMessageError, match="998"):
        apply(api_message(), url="https://u.example.com/" + "a" * 1000)


def test_message_id_date_mime_version_added() -> None:
    raw = HEADERS + text_leaf("plain", "x\n", "utf-8", "8bit")
    out = roundtrip(apply(raw))
    assert re.fullmatch(r"<[^<>@\s]+@mail\.example\.com>", out["Message-ID"])
    assert out["Date"] == format_datetime(NOW)
    assert out["MIME-Version"] == "1.0"


def test_naive_now_is_utc() -> None:
    out = apply(HEADERS + text_leaf("plain", "x\n", "utf-8", "8bit"), now=datetime(2024, 1, 2))
    assert out["Date"] == "Tue, 02 Jan 2024 00:00:00 +0000"


def test_existing_message_id_and_date_kept() -> None:
    msg = api_message()
    msg["Message-ID"] = "<keep-me@client.example>"
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0100"
    head = header_block(apply(msg).as_bytes())
    assert head.count(b"Message-ID:") == 1
    assert b"<keep-me@client.example>" in head
    assert head.count(b"\nDate:") == 1
    assert b"Mon, 01 Jan 2024 10:00:00 +0100" in head


def test_bad_message_id_domain_refused() -> None:
    with pytest.raises(InvalidMessageError, match="message_id_domain"):
        apply_compliance(
            api_message(),
            FOOTERS,
            list_unsubscribe_url=URL,
            list_unsubscribe_mailto=None,
            message_id_domain="bad domain>",
            now=NOW,
        )


def test_bytes_input_and_unchanged_parts_keep_their_header_bytes() -> None:
    long_name = "rapport-" + "x" * 90 + ".pdf"
    pdf = attachment("application/pdf", PDF, long_name)
    raw = HEADERS + multipart("mixed", text_leaf("plain", "x\n", "utf-8", "8bit"), pdf)
    assert pdf in apply(raw).as_bytes()  # the 100+ char header line is not refolded


# --- header injection (CVE-2024-6923) ---------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"Subject: =?utf-8?q?a=0D=0ABcc:_x@evil.example?=",
        b"Subject: =?utf-8?b?YQ0KQmNjOiB4QGV2aWwuZXhhbXBsZQ==?=",
        b"To: =?utf-8?q?Bob=0ABcc:_x@evil.example?= <bob@example.org>",
        b"X-Note: (=?utf-8?q?a=0D=0AX-Evil:_1?=) plain",
        b"Subject: nul \x00 byte",
    ],
)
def test_header_decoding_to_line_break_refused(header: bytes) -> None:
    raw = b"From: a@example.com\n" + header + b"\n" + text_leaf("plain", "x\n", "utf-8", "8bit")
    with pytest.raises(InvalidMessageError, match=r"header '(Subject|To|X-Note)'"):
        apply(raw)
    with pytest.raises(InvalidMessageError):
        apply(parse(raw))  # an EmailMessage the caller parsed with policy.default


def test_rfc2231_parameter_with_line_break_in_attachment_refused() -> None:
    evil = "Content-Disposition: attachment; filename*=utf-8''a%0D%0AX-Evil%3A%201\n"
    att = leaf("application/pdf", b"JVBERg==\n", cte="base64", extra=evil)
    raw = HEADERS + multipart("mixed", text_leaf("plain", "x\n", "utf-8", "8bit"), att)
    with pytest.raises(InvalidMessageError, match="Content-Disposition"):
        apply(raw)


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_header_with_other_splitlines_break_refused(char: str) -> None:
    # EmailPolicy writes a source value back as linesep.join(value.splitlines()): any of these
    # would become a real line break, i.e. an injected "Bcc:" header line.
    header = f"Subject: offre{char}Bcc: x@evil.example".encode()
    raw = b"From: a@example.com\n" + header + b"\n" + text_leaf("plain", "x\n", "utf-8", "8bit")
    with pytest.raises(InvalidMessageError, match="header 'Subject'"):
        apply(raw)
    with pytest.raises(InvalidMessageError):
        apply(parse(raw))


@pytest.mark.parametrize(
    "header",
    [
        b"Subject: =?utf-8?q?a b=0D=0ABcc:_x@evil.example?=",  # white space inside the word
        b"X-Note: see =?utf-8?b?YQ0KQ?= here",  # bad base64 padding, decoded leniently
        b"X-Note: x; name*=utf-7''+AA0-",  # RFC 2231, no percent sign: UTF-7 "\r"
        b"X-Note: x; name*0*=utf-8''a; name*1*=%0A",  # RFC 2231 continuation
    ],
)
def test_lax_encodings_decoding_to_line_break_refused(header: bytes) -> None:
    raw = b"From: a@example.com\n" + header + b"\n" + text_leaf("plain", "x\n", "utf-8", "8bit")
    with pytest.raises(InvalidMessageError, match=r"header '(Subject|X-Note)'"):
        apply(raw)


def test_utf7_rfc2231_filename_refused() -> None:
    evil = "Content-Disposition: attachment; filename*=utf-7''a+AA0ACg-X-Evil: 1\n"
    att = leaf("application/pdf", b"JVBERg==\n", cte="base64", extra=evil)
    raw = HEADERS + multipart("mixed", text_leaf("plain", "x\n", "utf-8", "8bit"), att)
    with pytest.raises(InvalidMessageError, match="Content-Disposition"):
        apply(raw)


def test_result_reads_like_policy_default() -> None:
    raw = (
        b"From: =?utf-8?q?Zo=C3=A9?= <zoe@example.com>\nTo: a@example.org, b@example.org\n"
        b"Subject: =?utf-8?q?Caf=C3=A9?=\n"
    ) + text_leaf("plain", "x\n", "utf-8", "8bit")
    out = apply(raw)
    ref = parse(raw)
    for name in ("From", "To", "Subject", "Content-Type", "Content-Transfer-Encoding"):
        assert str(out[name]) == str(ref[name]), name
        assert type(out[name]).__mro__[1:] == type(ref[name]).__mro__[1:], name
    assert [a.addr_spec for a in out["To"].addresses] == ["a@example.org", "b@example.org"]
    assert out["Content-Type"].params == {"charset": "utf-8"}
    assert str(out["Subject"]) == "Café"
    body = out.get_body(("plain",))
    assert body is not None
    assert FOOTERS.text in body.get_content()
    assert out.as_bytes(policy=out.policy.clone(linesep="\r\n")) == out.as_bytes().replace(
        b"\n", b"\r\n"
    )


def test_caller_message_without_boundary_left_alone() -> None:
    msg = api_message()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="offre.pdf")
    assert msg.get_boundary() is None  # the generator would set one on what it flattens
    before = [(p.get_content_type(), list(p.raw_items())) for p in msg.walk()]
    out = apply(msg)
    assert msg.get_boundary() is None
    assert [(p.get_content_type(), list(p.raw_items())) for p in msg.walk()] == before
    assert msg.policy is policy.default
    assert out.get_boundary() is not None


def test_caller_message_with_boundary_left_alone() -> None:
    msg = parse(HEADERS + multipart("mixed", text_leaf("plain", "x\n", "utf-8", "8bit")))
    original = msg.as_bytes()
    apply(msg)
    apply(apply(msg))  # a message of ours in, as the relay does
    assert msg.as_bytes() == original
    assert msg.policy is policy.default


def test_check_headers_safe_accepts_normal_and_encoded_headers() -> None:
    msg = api_message()
    msg["X-Greeting"] = "Café crème, déjà"
    check_headers_safe(msg)
    check_headers_safe(parse(msg.as_bytes()))


@given(
    st.text(min_size=0, max_size=20),
    st.sampled_from(["\r\n", "\n", "\r", "\x00"]),
    st.text(min_size=0, max_size=20),
    st.booleans(),
)
def test_property_any_encoded_line_break_refused(
    before: str, brk: str, after: str, b_encoding: bool
) -> None:
    data = (before + brk + after).encode()
    if b_encoding:
        encoded = "=?utf-8?b?" + base64.b64encode(data).decode() + "?="
    else:
        encoded = quoprimime.header_encode(data, "utf-8")
    raw = f"From: a@example.com\nSubject: {encoded}\n".encode() + text_leaf(
        "plain", "x\n", "utf-8", "8bit"
    )
    with pytest.raises(InvalidMessageError):
        apply(raw)


# --- List-Unsubscribe value --------------------------------------------------------------------


def test_build_list_unsubscribe() -> None:
    assert build_list_unsubscribe(URL, MAILTO) == f"<{URL}>, <{MAILTO}>"
    assert build_list_unsubscribe(URL, None) == f"<{URL}>"


@pytest.mark.parametrize(
    ("url", "mailto"),
    [
        ("http://unsub.example.com/u/1", None),
        ("ftp://unsub.example.com/u/1", None),
        ("https:///nohost", None),
        ("https://unsub.example.com/u/a b", None),
        ("https://unsub.example.com/u/<a>", None),
        ("https://unsub.example.com/u/a,b", None),
        ("https://unsub.example.com/u/a\r\nBcc: x", None),
        ("https://unsub.example.com/u/é", None),
        (URL, "unsubscribe@example.com"),
        (URL, "mailto:"),
        (URL, "mailto:a@example.com>, <https://evil.example"),
    ],
)
def test_build_list_unsubscribe_refuses(url: str, mailto: str | None) -> None:
    with pytest.raises(InvalidMessageError):
        build_list_unsubscribe(url, mailto)


def test_http_url_refused_by_apply_and_footer_context() -> None:
    with pytest.raises(InvalidMessageError, match="https"):
        apply(api_message(), url="http://unsub.example.com/u/1")
    with pytest.raises(InvalidMessageError, match="https"):
        make_ctx(unsubscribe_url="http://unsub.example.com/u/1")


_URL_CHARS = st.sampled_from("abcXYZ019-._~%/?=&;:@!$'()*+")


@given(st.text(_URL_CHARS, max_size=1100), st.booleans())
def test_property_list_unsubscribe_never_split_inside_brackets(
    path: str, with_mailto: bool
) -> None:
    url = "https://u.example.com/" + path
    mailto = MAILTO if with_mailto else None
    msg = HEADERS + text_leaf("plain", "x\n", "utf-8", "8bit")
    if len(url) + 2 + len("List-Unsubscribe: ") + 1 > 998:
        with pytest.raises(InvalidMessageError):
            apply(msg, url=url, mailto=mailto)
        return
    out = apply(msg, url=url, mailto=mailto)
    for pol in (OUTPUT_POLICY, policy.SMTP):
        data = out.as_bytes(policy=pol).replace(b"\r\n", b"\n")
        field = re.search(rb"\nList-Unsubscribe: (.*(?:\n[ \t].*)*)\n", data)
        assert field is not None
        lines = field.group(1).split(b"\n")
        assert all(len(line) <= 998 for line in lines)
        assert lines[0].startswith(b"<")
        assert all(line.startswith(b" <") for line in lines[1:])
        assert all(line.rstrip(b",").endswith(b">") for line in lines)
        assert b"".join(lines).decode() == build_list_unsubscribe(url, mailto)


# --- footer content -------------------------------------------------------------------------


def test_french_footer_content() -> None:
    text, page = FOOTERS.text, FOOTERS.html
    assert text.startswith("-- \n")
    assert "transmises par notre partenaire Salon Pro Events" in text
    assert "formulaire d'inscription, le 12 mars 2024" in text
    assert "Ceci est notre premier message" in text
    assert "Droit d'opposition" in text
    assert f": {URL}" in text
    assert "unsubscribe+tok-123@example.com" in text
    assert "Message envoyé pour le compte de Dupont & Fils, 12 rue de la Paix, 75002 Paris." in text
    assert text.rstrip().endswith(f"Se désinscrire : {URL}")
    for cls in (HTML_FOOTER_CLASS, HTML_ORIGIN_CLASS, HTML_OBJECTION_CLASS, HTML_OPTOUT_CLASS):
        assert f'class="{cls}"' in page
    assert page.count(f'href="{URL}"') == 2
    assert f'href="{MAILTO}"' in page
    assert "http://" not in page
    assert "<img" not in page
    assert "<link" not in page


def test_english_footer_content() -> None:
    footers = RENDERER.render(
        make_ctx(locale="en", first_contact=False, collected_at=date(2024, 3, 1))
    )
    assert "provided to us by our partner Salon Pro Events" in footers.text
    assert "on 1 March 2024" in footers.text
    assert "Right to object" in footers.text
    assert "Unsubscribe: " + URL in footers.text
    assert "Message sent on behalf of Dupont & Fils" in footers.text
    assert "first message" not in footers.text
    assert "first message" not in footers.html
    assert footers.template_hash != FOOTERS.template_hash


@pytest.mark.parametrize(
    ("changes", "fr", "en"),
    [
        ({"source_type": "direct", "source_name": None},
         "Dupont & Fils a collecté vos coordonnées directement auprès de vous",
         "Dupont & Fils collected your contact details directly from you"),
        ({"source_type": "broker", "source_name": "DataCo"},
         "par le fournisseur de données DataCo", "by the data provider DataCo"),
        ({"source_type": "public", "source_name": "Annuaire X"},
         "source accessible au public, Annuaire X", "publicly available source, Annuaire X"),
        ({"source_type": "partner", "source_name": None, "collection_method": None,
          "collected_at": None},
         "proviennent de plusieurs sources externes : partenaires, fournisseurs de données ou "
         "sources accessibles au public.", "come from several external sources"),
    ],
)  # fmt: skip
def test_origin_wording(changes: dict[str, object], fr: str, en: str) -> None:
    assert fr in RENDERER.render(make_ctx(**changes)).text
    assert en in RENDERER.render(make_ctx(locale="en", **changes)).text


def test_origin_block_in_every_message_notice_only_on_first_contact() -> None:
    later = RENDERER.render(make_ctx(first_contact=False))
    assert "Salon Pro Events" in later.text
    assert "Salon Pro Events" in later.html
    assert "premier message" not in later.text
    assert "premier message" not in later.html


def test_html_escapes_user_data_text_does_not() -> None:
    footers = RENDERER.render(
        make_ctx(
            advertiser_legal_name="Dupont & Fils <SARL>", source_name='<script>alert("x")</script>'
        )
    )
    assert "Dupont &amp; Fils &lt;SARL&gt;" in footers.html
    assert "<SARL>" not in footers.html
    assert "<script>" not in footers.html
    assert "Dupont & Fils <SARL>" in footers.text
    assert '<script>alert("x")</script>' in footers.text


def test_url_with_ampersand_escaped_in_href() -> None:
    footers = RENDERER.render(make_ctx(unsubscribe_url=URL + "?a=1&b=2"))
    assert f'href="{URL}?a=1&amp;b=2"' in footers.html
    assert f"{URL}?a=1&b=2" in footers.text


def test_line_breaks_in_user_data_cannot_fake_lines() -> None:
    footers = RENDERER.render(make_ctx(source_name="X\n-- \nFake: header", recipient_name="A\nB"))
    assert footers.text.count("\n-- \n") == 0
    assert footers.text.startswith("-- \n")
    assert "X -- Fake: header" in footers.text


def test_format_date() -> None:
    assert format_date(date(2024, 8, 1), "fr") == "1er août 2024"
    assert format_date(date(2024, 12, 25), "en") == "25 December 2024"


@pytest.mark.parametrize(
    "field", ["advertiser_legal_name", "advertiser_postal_address", "advertiser_contact"]
)
def test_identity_required(field: str) -> None:
    with pytest.raises(ConfigError, match="FR_SENDER_IDENTITY"):
        make_ctx(**{field: " \n "})


def test_bad_source_type_and_locale_refused() -> None:
    with pytest.raises(InvalidMessageError, match="source_type"):
        make_ctx(source_type="scraped")
    with pytest.raises(InvalidMessageError, match="locale"):
        make_ctx(locale="de")


def test_template_hash_is_stable_sha256() -> None:
    again = FooterRenderer().render(make_ctx(source_name="Autre"))
    assert re.fullmatch(r"[0-9a-f]{64}", FOOTERS.template_hash)
    assert again.template_hash == FOOTERS.template_hash  # same templates, other data


# --- user templates and render_string ------------------------------------------------------------


def test_user_template_dir_takes_precedence(tmp_path: Path) -> None:
    (tmp_path / "footer.fr.txt.j2").write_text(
        "-- \nMaison {{ advertiser_legal_name }} : stop {{ unsubscribe_url }}\n", encoding="utf-8"
    )
    renderer = FooterRenderer([tmp_path])
    footers = renderer.render(make_ctx())
    assert footers.text == f"-- \nMaison Dupont & Fils : stop {URL}\n"
    assert footers.html == FOOTERS.html  # the default HTML template still applies
    assert footers.template_hash != FOOTERS.template_hash


def test_user_template_missing_unsubscribe_refused(tmp_path: Path) -> None:
    (tmp_path / "footer.fr.html.j2").write_text("<p>{{ advertiser_legal_name }}</p>")
    with pytest.raises(ConfigError, match=r"footer\.fr\.html\.j2"):
        FooterRenderer([str(tmp_path)]).render(make_ctx())


def test_missing_template_folder_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FooterRenderer([tmp_path / "nope"])


def test_render_string_escapes_only_html() -> None:
    ctx = {"name": "Léa <b>&"}
    assert RENDERER.render_string("Bonjour {{ name }}", ctx, html=False) == "Bonjour Léa <b>&"
    assert RENDERER.render_string("<p>{{ name }}</p>", ctx, html=True) == (
        "<p>Léa &lt;b&gt;&amp;</p>"
    )
    assert RENDERER.render_string("<p>{{ name }}</p>", ctx, html=True) == (
        "<p>Léa &lt;b&gt;&amp;</p>"
    )  # cached template, same result
    assert RENDERER.env.get_template("footer.fr.txt.j2") is not None


def test_render_string_undefined_and_unsafe_refused() -> None:
    with pytest.raises(ConfigError, match="undefined"):
        RENDERER.render_string("{{ missing }}", {}, html=False)
    with pytest.raises(ConfigError):
        RENDERER.render_string("{{ x.__class__.__mro__ }}", {"x": 1}, html=False)


# --- property tests: random MIME trees -----------------------------------------------------------


@dataclass(frozen=True)
class TextSpec:
    sub: str
    body: str
    charset: str
    cte: str
    disposition: str | None


@dataclass(frozen=True)
class BinarySpec:
    ctype: str
    data: bytes
    disposition: str


@dataclass(frozen=True)
class MultiSpec:
    sub: str
    children: tuple[TextSpec | BinarySpec | MultiSpec, ...]


Spec = TextSpec | BinarySpec | MultiSpec
CHARSETS = ["us-ascii", "iso-8859-1", "iso-8859-15", "windows-1252", "utf-8"]
# No bare CR or other characters str.splitlines() treats as line breaks: text parts are lines.
_BODY_CHARS = st.characters(
    codec="utf-8", exclude_categories=("Cs", "Cc"), include_characters="\n\t"
).filter(lambda c: c not in "\x85\u2028\u2029")


@st.composite
def text_specs(draw: st.DrawFn) -> TextSpec:
    sub = draw(st.sampled_from(["plain", "html"]))
    charset = draw(st.sampled_from(CHARSETS))
    text = draw(st.text(_BODY_CHARS, max_size=200))
    text = text.encode(charset, "replace").decode(charset)
    if sub == "html":
        page = draw(st.sampled_from(["{}", "<html><body>{}</body></html>", "<BODY>{}</BODY>"]))
        text = page.replace("{}", text)
    ascii_only = text.isascii()
    cte = draw(st.sampled_from(["quoted-printable", "base64", "8bit"] + ["7bit"] * ascii_only))
    disposition = draw(st.sampled_from([None, "inline", "attachment"]))
    return TextSpec(sub, text, charset, cte, disposition)


binary_specs = st.builds(
    BinarySpec,
    st.sampled_from(["application/pdf", "image/png", "application/octet-stream"]),
    st.binary(max_size=300),
    st.sampled_from(["attachment", "inline"]),
)
specs: st.SearchStrategy[Spec] = st.recursive(
    text_specs() | binary_specs,
    lambda kids: st.builds(
        MultiSpec,
        st.sampled_from(["mixed", "alternative", "related"]),
        st.lists(kids, min_size=1, max_size=3).map(tuple),
    ),
    max_leaves=6,
)


def render_spec(spec: Spec) -> bytes:
    if isinstance(spec, MultiSpec):
        return multipart(spec.sub, *(render_spec(c) for c in spec.children))
    if isinstance(spec, BinarySpec):
        return attachment(spec.ctype, spec.data, "file.bin", spec.disposition)
    extra = "" if spec.disposition is None else f"Content-Disposition: {spec.disposition}\n"
    return text_leaf(spec.sub, spec.body, spec.charset, spec.cte, extra)


def spec_leaves(spec: Spec) -> list[TextSpec | BinarySpec]:
    if isinstance(spec, MultiSpec):
        return [leaf for child in spec.children for leaf in spec_leaves(child)]
    return [spec]


def footable(spec: TextSpec | BinarySpec) -> bool:
    return isinstance(spec, TextSpec) and spec.disposition != "attachment"


@given(specs)
@example(
    MultiSpec(
        "mixed",
        (
            TextSpec("plain", "é\n", "iso-8859-1", "8bit", None),
            BinarySpec("application/pdf", PDF, "attachment"),
        ),
    )
)
@example(TextSpec("html", "<BODY>€</BODY>", "utf-8", "base64", "inline"))
def test_property_random_mime_trees(spec: Spec) -> None:
    raw = HEADERS + render_spec(spec)
    if not any(footable(s) for s in spec_leaves(spec)):
        with pytest.raises(InvalidMessageError):
            apply(raw)
        return
    out_bytes = apply(raw).as_bytes()
    before, after = leaves(parse(raw)), leaves(parse(out_bytes))
    assert len(before) == len(after) == len(spec_leaves(spec))
    for s, old, new in zip(spec_leaves(spec), before, after, strict=True):
        if not footable(s):
            assert render_spec(s) in out_bytes  # header and payload bytes unchanged
            assert new.get_payload(decode=True) == old.get_payload(decode=True)
            continue
        assert isinstance(s, TextSpec)
        was, now = content(old), content(new)
        if s.sub == "plain":
            sep = "" if not was or was.endswith("\n") else "\n"
            assert now == (was + sep + "\n" + FOOTERS.text if was else FOOTERS.text)
        else:
            footer = expected_html(new)
            assert footer in now
            assert now.replace(footer, "", 1) == was
            if "</body>" in was.lower():
                assert now.find(footer) < now.lower().rfind("</body>")
        cte = str(new.get("Content-Transfer-Encoding", "7bit"))
        assert (cte == "base64") == (s.cte == "base64")
        if s.sub == "html" or new.get_content_charset() != "utf-8":
            assert new.get_content_charset() == s.charset
    head = header_block(out_bytes)
    assert head.count(b"\nList-Unsubscribe:") == 1
    assert head.count(b"\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n") == 1
