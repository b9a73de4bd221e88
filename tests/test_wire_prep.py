"""Count-first fast paths give exactly what the regexes they skip would give."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from prospect_mailer import mime, transport
from prospect_mailer.mime import GIL_PIECE, crlf_only
from prospect_mailer.relay_handler import _BARE_LINE_BREAK, bare_line_break
from prospect_mailer.transport import _prepare_data

chunks = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".."]), max_size=30
)


@settings(max_examples=2000, deadline=None)
@given(chunks)
def test_prepare_data_is_what_aiosmtplib_sends(parts: list[bytes]) -> None:
    message = b"".join(parts)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    size, content = _prepare_data(message)
    assert content == expected
    assert size == len(normalize_message_line_endings(message))  # RFC 1870, as aiosmtplib counts


@settings(max_examples=2000, deadline=None)
@given(chunks)
def test_bare_line_break_finds_the_first_one(parts: list[bytes]) -> None:
    data = b"".join(parts)
    match = _BARE_LINE_BREAK.search(data)
    assert bare_line_break(data) == (None if match is None else match.start())


@contextlib.contextmanager
def pieces_of(size: int) -> Iterator[None]:
    """Big-message piecewise paths taken on small inputs: pieces of ``size`` bytes."""
    saved = mime.GIL_PIECE, transport.GIL_PIECE
    mime.GIL_PIECE = transport.GIL_PIECE = size
    try:
        yield
    finally:
        mime.GIL_PIECE, transport.GIL_PIECE = saved


@pytest.mark.parametrize("piece", [1, 2, 3, 5])
@settings(max_examples=1000, deadline=None)
@given(parts=chunks)
def test_in_pieces_the_same_answers(piece: int, parts: list[bytes]) -> None:
    """A big message is counted and dot-stuffed in pieces (the GIL changes hands between
    them): the same answers as in one go, whatever falls on a piece's edge."""
    data = b"".join(parts)
    whole = crlf_only(data), _prepare_data(data)
    with pieces_of(piece):
        assert (crlf_only(data), _prepare_data(data)) == whole
    assert whole[0] == (_BARE_LINE_BREAK.search(data) is None)


def test_a_big_message_across_piece_edges() -> None:
    """Over GIL_PIECE: a lone LF or CR, a CRLF split by a piece's edge, a dot starting the
    line just after one."""
    line = b"x" * 998 + b"\r\n"
    body = line * (3 * GIL_PIECE // len(line))
    assert crlf_only(body)
    edge = GIL_PIECE - 1  # a CRLF across the first edge: CR before it, LF at it
    split = body[: edge - 998] + line + body[edge - 998 + len(line) :]
    assert split[edge : edge + 2] == b"\r\n"
    assert crlf_only(split)
    assert not crlf_only(body[:GIL_PIECE] + b"\n" + body[GIL_PIECE:])
    assert not crlf_only(body[:GIL_PIECE] + b"\r" + body[GIL_PIECE:])
    assert not crlf_only(b"\n" + body)
    assert not crlf_only(body + b"\r")
    at = body.find(b"\n", GIL_PIECE) + 1  # the line where _prepare_data's second piece starts
    dotted = body[:at] + b"." + body[at:]
    size, content = _prepare_data(dotted)
    assert size == len(dotted)
    assert content == PERIOD_REGEX.sub(b"..", dotted) + b".\r\n"
    assert content[at : at + 3] == b"..x"


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-3, minutes=-30))]))
)
def test_date_value_is_format_datetime(now: datetime) -> None:
    """The Date value formatted once a second is what the email package writes for ``now``
    (naive taken as UTC), whatever the microseconds and the zone."""
    aware = now if now.tzinfo else now.replace(tzinfo=UTC)
    assert mime.date_value(now) == format_datetime(aware)
    assert mime.date_value(now.replace(microsecond=999_999)) == format_datetime(aware)
    # The same instant in another zone (an equal datetime) is written with its own offset.
    elsewhere = aware.astimezone(timezone(timedelta(hours=5, minutes=45)))
    assert mime.date_value(elsewhere) == format_datetime(elsewhere)
    assert mime.date_value(now) == format_datetime(aware)
