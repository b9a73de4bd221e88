"""The relay's fast MAIL FROM / RCPT TO address parsing gives what aiosmtpd's parser gives."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from prospect_mailer.relay import RelaySession


class _Handler:
    pass


REFERENCE = SMTP(_Handler())
SESSION = object.__new__(RelaySession)  # only _getaddr is called: no server needed
SESSION.local_part_limit = REFERENCE.local_part_limit


def outcome(parse: object, arg: str) -> object:
    try:
        return parse(arg)  # type: ignore[operator]
    except Exception as exc:  # aiosmtpd's parser crashes on some input ('<_@[>'): same crash
        return type(exc)


def both(arg: str) -> tuple[object, object]:
    return outcome(REFERENCE._getaddr, arg), outcome(SESSION._getaddr, arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        " <a@b.example>",
        "<a@b.example> SIZE=100",
        "<a@b.example>  BODY=8BITMIME SMTPUTF8",
        "<a.b+c@x-y.example>   ",
        "<a@b.example>(comment) SIZE=1",
        "<a..b@x.example>",
        '<"q"@x.example>',
        "<a@[1.2.3.4]>",
        "<é@x.example>",
        "a@b.example",
        "<>",
        "<a@b.example",
        "<a@b.example>x",
        f"<{'x' * 65}@b.example>",  # local part over aiosmtpd's limit: refused by both
    ],
)
def test_known_forms(arg: str) -> None:
    reference, fast = both(arg)
    assert fast == reference


@settings(max_examples=3000, deadline=None)
@given(
    local=st.text('ab.-+_"é', min_size=0, max_size=6),
    domain=st.text("ab.-[]1", min_size=0, max_size=8),
    tail=st.sampled_from(["", " ", " SIZE=1", "(c)", "\t", "  (c) X", "x", ">"]),
    lead=st.sampled_from(["", " ", "\t", "<<"]),
)
def test_any_form_parses_as_aiosmtpd_does(local: str, domain: str, tail: str, lead: str) -> None:
    reference, fast = both(f"{lead}<{local}@{domain}>{tail}")
    assert fast == reference
