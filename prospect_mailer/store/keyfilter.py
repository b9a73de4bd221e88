"""A Bloom filter over the suppression list's keys: most keys of a batch never reach SQLite.

Nearly every key a send checks is absent from the list, and proving a key absent costs an
index descent (about 3 to 9 µs on 10,000,000 entries, most of it waiting on memory). The filter
answers "certainly absent" for about 99.7% of absent keys in well under a microsecond each, from
memory (20 bits an entry: 25 MB for 10,000,000 entries); the remaining keys, the listed ones and
a few false positives, are looked up in SQLite as before. A filter never answers "absent" for a
key it was given; kept up to date as below, it cannot let a listed recipient through (the one
write it cannot see: one made on a connection that turned SQLite's triggers off). A false
positive only costs a lookup.

It holds the first 16 hex digits of each key (what the lookup index holds), read as a 64-bit
number whose two halves give the three bit positions (double hashing: the keys are SHA-256
digests, already uniform). A key that is not hex is always a candidate.

Freshness is the reader's job (:mod:`~prospect_mailer.store.fastread`): the filter records the
``suppression_state`` it was built at (see :data:`STATE_DDL`) and is brought up to date, or
dropped, before each use.

A built filter is saved in the database (``suppression_filter``, one row: the bits and the
state they hold), so the next process loads it (0.03-0.1 s for 10,000,000 entries) and reads
only the entries added since, instead of building it again (11-23 s). Being in the same
file as the list, it is backed up and restored with it, so a restored list never meets a
filter of another list. The bits come from hashes of the keys, which are hashes already: no
address can be read back from them.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .tables import SUPPRESSION_KEY_PREFIX, SUPPRESSION_PREFIX_SQL

__all__ = [
    "BITS_PER_ENTRY",
    "FILTER_COLUMNS",
    "SCHEME",
    "STATE_COLUMNS",
    "STATE_DDL",
    "STATE_SQL",
    "STATE_TRIGGERS",
    "KeyFilter",
    "State",
    "build_filter",
    "load_filter",
    "mark_of",
    "new_prefixes",
    "read_state",
    "save_filter",
]

#: Bits of filter per entry it is built for: with three positions a key, 0.3% of absent keys
#: pass at that size, 0.9% once the list has grown by half (when the reader rebuilds it).
BITS_PER_ENTRY = 20
#: The smallest filter (128 KiB): a small list's filter is still cheap and barely ever full.
MIN_BITS = 1 << 20
#: The list may grow by this share of the entries a filter was built for before a rebuild.
GROWTH = 0.5
_HALF = 0xFFFFFFFF
_ROWS = 65_536  # index entries read by one statement while building

#: SQLite: the one-row table that tells a reader which entries its filter lacks, kept by
#: triggers (on every connection that has not turned triggers off: see the README).
#: ``high`` is the highest entry id ever inserted; ``misordered`` counts the inserts whose id
#: was not above it (an id reused after the highest entry was deleted, or set by hand) and the
#: updates of an id or a key; ``removed`` counts deletions; ``epoch`` is drawn at random when
#: the row is created. While the epoch and ``misordered`` are unchanged, the entries added
#: since a filter was built are exactly those with an id above its ``high``, and only those
#: are read. A deletion needs nothing (a stale key only costs a lookup), but a count that goes
#: back, a ``high`` that goes back, or another entry at the filter's ``high`` than the one it
#: saw (:data:`MARK_SQL`) means the file went back in time (a backup restored under a running
#: process): entries the filter never saw may be back, so it is built again.
STATE_DDL = (
    "CREATE TABLE IF NOT EXISTS suppression_state (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "epoch TEXT NOT NULL, high INTEGER NOT NULL, misordered INTEGER NOT NULL, "
    "removed INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO suppression_state (id, epoch, high, misordered, removed) "
    "SELECT 1, lower(hex(randomblob(16))), coalesce(max(id), 0), 0, 0 FROM suppression",
    "CREATE TRIGGER IF NOT EXISTS suppression_state_insert_v2 AFTER INSERT ON suppression "
    "BEGIN UPDATE suppression_state SET misordered = misordered + (NEW.id <= high), "
    "high = max(high, NEW.id) WHERE id = 1; END",
    # Any UPDATE statement: `UPDATE OF id` would miss an id changed through rowid or oid.
    "CREATE TRIGGER IF NOT EXISTS suppression_state_update_v2 AFTER UPDATE ON suppression "
    "WHEN OLD.id IS NOT NEW.id OR OLD.key_hash IS NOT NEW.key_hash "
    "BEGIN UPDATE suppression_state SET misordered = misordered + 1 WHERE id = 1; END",
    "CREATE TRIGGER IF NOT EXISTS suppression_state_delete_v2 AFTER DELETE ON suppression "
    "BEGIN UPDATE suppression_state SET removed = removed + 1 WHERE id = 1; END",
    # The last filter a reader built, with the state it holds every entry of (see the
    # module doc); a reader loads it instead of building one when it is still usable.
    "CREATE TABLE IF NOT EXISTS suppression_filter (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "scheme TEXT NOT NULL, epoch TEXT NOT NULL, high INTEGER NOT NULL, "
    "misordered INTEGER NOT NULL, removed INTEGER NOT NULL, mark TEXT, "
    "bits_count INTEGER NOT NULL, sized_for INTEGER NOT NULL, added INTEGER NOT NULL, "
    "bits BLOB NOT NULL, saved_at TEXT NOT NULL)",
)
#: The columns of the two tables as :data:`STATE_DDL` creates them (an older layout, of a
#: build of this schema version before the epoch, is dropped and created again).
STATE_COLUMNS = ("id", "epoch", "high", "misordered", "removed")
FILTER_COLUMNS = (
    "id", "scheme", "epoch", "high", "misordered", "removed", "mark", "bits_count",
    "sized_for", "added", "bits", "saved_at",
)  # fmt: skip
#: How a saved filter's bits were laid out: one saved by another layout is not loaded.
SCHEME = "bloom3-prefix64-v2"
#: The triggers :data:`STATE_DDL` creates (checked at open and with every state read).
STATE_TRIGGERS = (
    "suppression_state_insert_v2",
    "suppression_state_update_v2",
    "suppression_state_delete_v2",
)
#: What identifies the entry at an id: its key's prefix and when it was listed (``NULL``:
#: no entry there).
_MARK = f"{SUPPRESSION_PREFIX_SQL} || '|' || created_at"
#: The state, how many of :data:`STATE_TRIGGERS` exist (read with it: a trigger dropped by
#: hand, even while a process runs, stops the filters), and the mark of the entry at ``?``.
STATE_SQL = (
    "SELECT epoch, high, misordered, removed, (SELECT count(*) FROM sqlite_master "  # noqa: S608
    f"WHERE type = 'trigger' AND name IN {STATE_TRIGGERS!r}), "
    f"(SELECT {_MARK} FROM suppression WHERE id = ?) FROM suppression_state WHERE id = 1"
)
#: The mark of the entry at ``?``.
MARK_SQL = f"SELECT {_MARK} FROM suppression WHERE id = ?"  # noqa: S608 - constant names


# Building reads the prefix index, the smallest thing holding every key's prefix (about 1 s
# to scan 10M entries, against 3 s for the unique constraint's index or the table, the
# planner's own choice), one stretch after a given prefix at a time. A stretch may end inside
# a run of equal prefixes; the next one starts after it, which only skips prefixes added.
_P = SUPPRESSION_PREFIX_SQL  # spelt as the index spells it, for the index to serve
_STRETCH_ROWS = (
    f"SELECT {_P} AS p FROM suppression INDEXED BY ix_suppression_prefix "  # noqa: S608
    f"WHERE {_P} > ? ORDER BY {_P} LIMIT ?"
)
# The same stretch as how many, the last, and all of them as one text.
_STRETCH = f"SELECT count(*), max(p), group_concat(p, '') FROM ({_STRETCH_ROWS})"  # noqa: S608
_NEW_PREFIXES = f"SELECT {_P} FROM suppression WHERE id > ? AND id <= ?"  # noqa: S608


class State(NamedTuple):
    """What :func:`read_state` read: ``suppression_state``, and the mark of the entry at the
    id it was asked about."""

    epoch: str
    high: int
    misordered: int
    removed: int
    mark_at: str | None


def read_state(con: sqlite3.Connection, at: int) -> State:
    """``suppression_state``, with the mark of the entry at id ``at``.

    Raises:
        ValueError: no state row, or a trigger keeping it is missing (changes may go
            uncounted: no filter may be used).
        sqlite3.Error: the database failed (no such table...).
    """
    row = con.execute(STATE_SQL, (at,)).fetchone()
    if row is None:
        raise ValueError("suppression_state has no row")
    epoch, high, misordered, removed, triggers, mark = row
    if triggers != len(STATE_TRIGGERS):
        raise ValueError("a trigger keeping suppression_state is missing")
    return State(str(epoch), int(high), int(misordered), int(removed), mark)


def mark_of(con: sqlite3.Connection, at: int) -> str | None:
    """The mark of the entry at id ``at`` (``None``: none there).

    Raises:
        sqlite3.Error: the database failed.
    """
    row = con.execute(MARK_SQL, (at,)).fetchone()
    return None if row is None else row[0]


class KeyFilter:
    """The filter itself: :meth:`add` prefixes, ask :meth:`candidates`. Not thread-safe: the
    reader mutates and reads it under its lock."""

    def __init__(
        self,
        entries: int,
        high: int = 0,
        misordered: int = 0,
        *,
        epoch: str = "",
        removed: int = 0,
        mark: str | None = None,
    ) -> None:
        """An empty filter sized for ``entries`` keys, holding every entry of the state
        ``(epoch, high, misordered, removed)``; ``mark``: that of the entry at ``high``."""
        self.bits_count = max(MIN_BITS, BITS_PER_ENTRY * entries)
        self._bits = bytearray((self.bits_count + 7) // 8)
        #: The entries it was sized for; :attr:`full` past ``1 + GROWTH`` times as many.
        self.sized_for = max(entries, MIN_BITS // BITS_PER_ENTRY)
        #: How many prefixes were added (counting repeats).
        self.added = 0
        #: The ``suppression_state`` the filter holds every entry of (see :data:`STATE_DDL`).
        self.epoch = epoch
        self.high = high
        self.misordered = misordered
        self.removed = removed
        self.mark = mark
        #: ``built`` here, or ``loaded`` from the database.
        self.origin = "built"

    def lacks_only_newer(self, state: State) -> bool:
        """Whether what the filter lacks at ``state`` (read with the mark of the entry at
        :attr:`high`) is exactly the entries with an id above :attr:`high`."""
        return (
            state.epoch == self.epoch
            and state.misordered == self.misordered
            and state.removed >= self.removed
            and state.high >= self.high
            and state.mark_at == self.mark
        )

    def catch_up(self, con: sqlite3.Connection, state: State) -> int:
        """Add the entries with an id up to ``state.high`` above :attr:`high` and move to
        ``state`` (only when :meth:`lacks_only_newer`); how many ids it was behind.

        Raises:
            sqlite3.Error: the database failed.
        """
        behind = state.high - self.high
        if behind:
            self.add(new_prefixes(con, self.high, state.high))
            self.high = state.high
            self.mark = mark_of(con, state.high)
        self.removed = state.removed
        return behind

    @property
    def nbytes(self) -> int:
        """Memory held by the bits."""
        return len(self._bits)

    @property
    def full(self) -> bool:
        """Grown past its size by more than :data:`GROWTH`: still right, but more keys pass."""
        return self.added > self.sized_for * (1 + GROWTH)

    def add(self, prefixes: Iterable[str]) -> None:
        """Add keys, or their first 16 hex digits (a longer key is cut)."""
        values = []
        for prefix in prefixes:
            try:
                values.append(int(prefix[:SUPPRESSION_KEY_PREFIX], 16))
            except ValueError:
                # Never looked for in the filter: a key that is not hex is always a candidate.
                self.added += 1
        self.add_values(values)

    def add_values(self, values: Iterable[int]) -> None:
        """Add keys given as their first 16 hex digits' value (``int(key[:16], 16)``)."""
        bits, m = self._bits, self.bits_count
        n = 0
        for v in values:
            n += 1
            a, b = v >> 32, v & _HALF
            p = a % m
            bits[p >> 3] |= 1 << (p & 7)
            p = (a + b) % m
            bits[p >> 3] |= 1 << (p & 7)
            p = (a + 2 * b) % m
            bits[p >> 3] |= 1 << (p & 7)
        self.added += n

    def candidates(self, keys: Sequence[str]) -> list[str]:
        """The keys that may be listed (every listed key, and about 0.3% of the others)."""
        bits, m = self._bits, self.bits_count
        out = []
        for key in keys:
            try:
                v = int(key[:SUPPRESSION_KEY_PREFIX], 16)
            except ValueError:
                out.append(key)
                continue
            a, b = v >> 32, v & _HALF
            p = a % m
            if bits[p >> 3] >> (p & 7) & 1:
                p = (a + b) % m
                if bits[p >> 3] >> (p & 7) & 1:
                    p = (a + 2 * b) % m
                    if bits[p >> 3] >> (p & 7) & 1:
                        out.append(key)
        return out


def build_filter(
    con: sqlite3.Connection, stop: threading.Event | None = None, *, stretch: int = _ROWS
) -> KeyFilter | None:
    """A filter of every entry, read on ``con``; ``None`` if ``stop`` was set meanwhile.

    The state is read first, then the prefix index in ascending stretches of ``stretch``
    entries (short statements: a checkpoint of the WAL is never held up for the whole
    build). Every entry there at the state's reading is in some stretch (an entry moves in
    the index only if its key changes, which the state counts); one added meanwhile may be
    in the filter or not: its id is above the state's ``high``, so the first use of the
    filter reads it again. A stretch comes as one text (no row objects) read into integers by
    :class:`array.array`, unless an odd stored key (not 16 hex digits) makes it uneven: that
    stretch is then read row by row, and the next one starts after the last row read (not
    after the first reading's last: entries added between the two readings would push old
    ones out of the second).

    Raises:
        sqlite3.Error: the database failed.
        ValueError: the state cannot be trusted (see :func:`read_state`).
    """
    state = read_state(con, 0)
    built = KeyFilter(
        state.high,  # ids are never fewer than the entries
        state.high,
        state.misordered,
        epoch=state.epoch,
        removed=state.removed,
        mark=mark_of(con, state.high),
    )
    last = ""
    while True:
        if stop is not None and stop.is_set():
            return None
        count, top, text = con.execute(_STRETCH, (last, stretch)).fetchone()
        if not count:
            return built
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(text) == 16 * count and len(raw) == 8 * count:
            values = array("Q")
            values.frombytes(raw)
            if sys.byteorder == "little":
                values.byteswap()  # the hex digits are big-endian
            built.add_values(values)
            last = top
        else:
            rows = [row[0] for row in con.execute(_STRETCH_ROWS, (last, stretch))]
            built.add(rows)
            if not rows:
                return built  # all gone meanwhile: the rest were deleted or come by id
            last = rows[-1]


_LOAD = (
    "SELECT scheme, epoch, high, misordered, removed, mark, bits_count, sized_for, added, "
    "typeof(bits), length(bits) FROM suppression_filter WHERE id = 1"
)
_READ = 1 << 20  # bytes of a saved filter read at a time (no second copy of it in memory)
# Every column of the table, by name (the list is FILTER_COLUMNS, checked at open).
_SAVE = (
    f"INSERT OR REPLACE INTO suppression_filter ({', '.join(FILTER_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(':' + c for c in FILTER_COLUMNS)})"
)


def load_filter(con: sqlite3.Connection) -> KeyFilter | None:
    """The filter saved in the database, if there is one of this :data:`SCHEME` whose bits
    are whole; its state is the one saved with it (the caller checks it is still usable).

    Raises:
        sqlite3.Error: the database failed.
    """
    # One transaction: the bits read are those of the row described (another process may
    # save a new filter meanwhile).
    con.execute("BEGIN")
    try:
        row = con.execute(_LOAD).fetchone()
        if row is None:
            return None
        scheme, epoch, high, misordered, removed, mark, bits_count, sized_for, added = row[:9]
        kind, size = row[9:]
        if (
            scheme != SCHEME
            or not isinstance(epoch, str)
            or not isinstance(removed, int)
            or not (mark is None or isinstance(mark, str))
            or kind != "blob"
            or not all(isinstance(n, int) for n in (high, misordered, bits_count, sized_for, added))
            or bits_count < MIN_BITS
            or size != (bits_count + 7) // 8
        ):
            return None
        bits = bytearray(size)
        view = memoryview(bits)
        with con.blobopen("suppression_filter", "bits", 1, readonly=True) as blob:
            if len(blob) != size:
                return None
            for at in range(0, size, _READ):
                part = blob.read(_READ)
                view[at : at + len(part)] = part
    finally:
        con.execute("COMMIT")
    loaded = KeyFilter(0, high, misordered, epoch=epoch, removed=removed, mark=mark)
    loaded.bits_count, loaded.sized_for, loaded.added = bits_count, sized_for, added
    loaded._bits = bits
    loaded.origin = "loaded"
    return loaded


def save_filter(con: sqlite3.Connection, saved: KeyFilter, at: str) -> None:
    """Save ``saved`` (replacing the one saved before) in one transaction on ``con``, a
    writable connection; ``at``: when, as text.

    Raises:
        sqlite3.Error: the database failed (locked too long, read-only...).
    """
    row = {
        "id": 1,
        "scheme": SCHEME,
        "epoch": saved.epoch,
        "high": saved.high,
        "misordered": saved.misordered,
        "removed": saved.removed,
        "mark": saved.mark,
        "bits_count": saved.bits_count,
        "sized_for": saved.sized_for,
        "added": saved.added,
        "bits": saved._bits,  # bound as a blob, not copied first
        "saved_at": at,
    }
    with con:
        con.execute(_SAVE, row)


def new_prefixes(con: sqlite3.Connection, after: int, upto: int) -> list[str]:
    """Prefixes of the entries with an id in ``(after, upto]``.

    Raises:
        sqlite3.Error: the database failed.
    """
    return [row[0] for row in con.execute(_NEW_PREFIXES, (after, upto)).fetchall()]
