"""Time-ordered identifiers for audit events and sends (UUID version 7, RFC 9562 section 5.7).

``event_id`` and ``send_id`` are indexed columns that only ever grow. With random identifiers
(UUID version 4) every insert lands on a random leaf page of each of those indexes: a group
commit of a few sends writes one page per record per index to the WAL, and once the audit log
outgrows the page cache each insert first reads its random page back from disk. Identifiers
that start with the time land on the rightmost pages, the ones the previous inserts touched.

The form is unchanged: 32 lowercase hex digits, unique without coordination (74 random bits
per millisecond), readable by :class:`uuid.UUID`. The first 12 digits are the creation time in
milliseconds, which the audit record states anyway (``created_at``).
"""

from __future__ import annotations

import os
import time

__all__ = ["new_id"]

_VERSION = 7 << 76
_VARIANT = 0b10 << 62


def new_id() -> str:
    """A new UUIDv7 as 32 hex digits: Unix time in ms (48 bits), version 7, then 74 random
    bits with the RFC variant; ids of later milliseconds sort after earlier ones."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 for rand_a, 62 for rand_b
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | _VERSION
        | (rand >> 68) << 64
        | _VARIANT
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    return f"{value:032x}"
