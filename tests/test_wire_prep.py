"""Count-first fast paths give exactly what the regexes they skip would give."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

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
