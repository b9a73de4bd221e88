"""DATA read in blocks (relay_data.read_data) gives exactly what aiosmtpd's line loop gives."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from prospect_mailer.relay_data import REPLY_LINE_TOO_LONG, REPLY_TOO_MUCH_DATA, read_data


async def aiosmtpd_data(
    reader: asyncio.StreamReader, size_limit: int | None, line_limit: int
) -> bytes | str | None:
    """aiosmtpd 1.4.6's ``SMTP.smtp_DATA`` reading loop, transcribed (the oracle)."""
    data: list[bytearray] = []
    num_bytes = 0
    fragments: list[bytes] = []
    state = "nominal"
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            if state == "nominal":
                state = "too_long"
            data.clear()
            line = await reader.read(e.consumed)
        except asyncio.IncompleteReadError:
            return None
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state == "nominal" and size_limit and num_bytes > size_limit:
            state = "too_much"
            data.clear()
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state == "nominal":
                whole = b"".join(fragments)
                if len(whole) > line_limit:
                    state = "too_long"
                    data.clear()
                else:
                    data.append(bytearray(whole))
            fragments.clear()
    if state == "too_long":
        return REPLY_LINE_TOO_LONG
    if state == "too_much":
        return REPLY_TOO_MUCH_DATA
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return b"".join(data)


async def both(
    wire: bytes, cuts: list[int], limit: int, size_limit: int | None
) -> tuple[tuple[bytes | str | None, bytes], tuple[bytes | str | None, bytes]]:
    """Each reader fed ``wire`` piece by piece (cut at ``cuts``) *while* it reads, as bytes
    arrive from a socket: (result, bytes left unread)."""
    out = []
    for read in (
        lambda r: read_data(r, size_limit=size_limit, line_limit=limit),
        lambda r: aiosmtpd_data(r, size_limit, limit),
    ):
        reader = asyncio.StreamReader(limit=limit)  # aiosmtpd: limit = line_length_limit
        task = asyncio.ensure_future(read(reader))
        at = 0
        for cut in [*sorted(set(cuts)), len(wire)]:
            reader.feed_data(wire[at:cut])
            at = cut
            for _ in range(3):  # let the reader take what is there before more arrives
                await asyncio.sleep(0)
        reader.feed_eof()
        result = await task
        out.append((result, await reader.read()))
    return out[0], out[1]


pieces = st.sampled_from(
    [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r\n", b"x" * 40]
)


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(pieces, max_size=40),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    st.sampled_from([8, 16, 64, 1001]),
    st.sampled_from([None, 0, 50, 200]),
)
def test_read_data_is_aiosmtpds_line_loop(
    parts: list[bytes], cuts: list[int], limit: int, size_limit: int | None
) -> None:
    wire = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"  # what follows the end stays unread
    cuts = [c for c in cuts if c <= len(wire)]
    (ours, left), (theirs, their_left) = asyncio.run(both(wire, cuts, limit, size_limit))
    assert left == their_left
    refusals = {REPLY_LINE_TOO_LONG, REPLY_TOO_MUCH_DATA}
    if ours in refusals and theirs in refusals and ours != theirs:
        # Both limits were passed; aiosmtpd names the one it met first, line by line, this
        # one the one it met first block by block. Either refusal is right.
        assert size_limit
        return
    assert ours == theirs


async def test_a_2_kb_message_takes_a_few_reads_not_one_per_line() -> None:
    # 40 lines, every fifth ending with a full stop (a possible end: one more read each).
    lines = [
        b"Line %d of a prospecting message, with words%s" % (i, b"." * (i % 5 == 4))
        for i in range(40)
    ]
    content = b"\r\n".join(lines) + b"\r\n"
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(content + b".\r\n")
    reader.feed_eof()
    calls = 0
    readuntil = reader.readuntil

    async def counting(separator: bytes = b"\n") -> bytes:
        nonlocal calls
        calls += 1
        return await readuntil(separator)

    reader.readuntil = counting  # type: ignore[method-assign]
    assert await read_data(reader, size_limit=None, line_limit=1001) == content
    assert calls <= 12  # aiosmtpd: 41


async def test_end_of_stream_before_the_end_of_data_is_none() -> None:
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(b"Subject: x\r\n\r\nno end")
    reader.feed_eof()
    assert await read_data(reader, size_limit=None, line_limit=1001) is None


async def test_a_line_end_split_between_two_reads_is_still_one() -> None:
    """A block cut between the CR and the LF of a line end: two legal lines were once counted
    as one too long, and the message refused (found in review)."""
    content = b"a" * 900 + b"\r\n" + b"b" * 99 + b"\r\n" + b"X" + b"c" * 950 + b"\r\n"
    first = content.index(b"X") + 1  # 1,004 bytes ending in "\r\nX": past the limit, no end
    reader = asyncio.StreamReader(limit=1001)
    task = asyncio.ensure_future(read_data(reader, size_limit=None, line_limit=1001))
    reader.feed_data(content[:first])
    for _ in range(3):
        await asyncio.sleep(0)
    reader.feed_data(content[first:] + b".\r\n")
    reader.feed_eof()
    assert await task == content
