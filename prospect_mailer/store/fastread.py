"""A direct read path for suppression lookups on SQLite (the RCPT-time hot path).

Through SQLAlchemy's async layer a point lookup costs about 340 µs (a greenlet switch and a
hop to aiosqlite's thread); the indexed query itself takes under 10 µs. This reader keeps
read-only stdlib ``sqlite3`` connections on the same file. Small lookups (a relay's RCPT, a
handful of keys) run inline on one of them: an indexed probe of a few microseconds costs the
event loop less than the thread hop would. Large batches run in worker threads, on the others,
so the loop stays responsive.
WAL mode lets this reader see every committed write at once.

Screening (schema version 4): once the first large batch has asked, a thread of its own
loads the Bloom filter of the list's keys saved in the database, or builds and saves one
(:mod:`~prospect_mailer.store.keyfilter`; 25 MB for 10,000,000 entries, 0.03-0.1 s to load,
11-23 s to build), and from then on every large lookup asks it first: only
the keys it cannot rule out, the listed ones and about 0.3% of the others, are looked up in
SQLite. Small lookups (a relay's RCPT) are not screened: reading the state costs about what
it would save them.
Before each use the filter is checked against the one-row ``suppression_state`` that
triggers keep on every write (a point read of a few microseconds, with the triggers'
presence): entries added since it was built are read by id and added, so a key listed a
moment ago by another process is found; a change it cannot account for that way (an id
reused, a key changed, the file gone back to a backup) drops it and a new one is built, the
lookups going to SQLite meanwhile, as they do before the first build and whenever the state
cannot be read or a trigger is missing. The one write it cannot see is one made on a
connection that turned triggers off (``SQLITE_DBCONFIG_ENABLE_TRIGGER``; see the README).

Keys are probed through the index on their first 16 hex digits (``ix_suppression_prefix``,
schema version 3): 253 MB for 10,000,000 entries against 1.5 GB for the covering index of the
whole key it replaced, so a probe for an absent key, nearly every key of a prospect list,
reads fewer pages (about 2.9 against 5.5 ms per 1,000 absent keys on one connection); a
listed key then reads its row from the table (about 4.7 µs more). Rows are kept only for the
keys asked: two keys may share their first 16 digits.

A large batch (a ``send_many`` chunk of 1,000) is split between a few more connections, each
in its own thread. Each part is one aggregate query (``json_group_array``) whose single step
does every index probe with the GIL released, so the parts really run at once; read row by
row, the threads would pass the GIL back and forth at every row and gain nothing. On two
cores this takes a batch from about 5.5 to 3.9 ms with half its keys listed
(``python -m bench.suppression``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import StoreError
from .keyfilter import KeyFilter, build_filter, load_filter, read_state, save_filter
from .tables import SUPPRESSION_PREFIX_SQL, suppression_prefixes

__all__ = ["INLINE_MAX_KEYS", "SQLiteReader"]

log = logging.getLogger("prospect_mailer.store")

#: Lookups of at most this many keys run on the event loop thread.
INLINE_MAX_KEYS = 32
_CHUNK = 900
_COLUMNS = "kind, key_hash, scope, scope_value, reason, source, created_at"
# Probed by the keys' prefixes, through the prefix index (``ix_suppression_prefix``); the
# rows are then kept only for the keys asked (two keys may share a prefix).
_SELECT = (
    f"SELECT {_COLUMNS} FROM suppression "  # noqa: S608 - constant names
    f"WHERE {SUPPRESSION_PREFIX_SQL} IN ({{marks}})"
)
# The same rows as one JSON text: one sqlite3_step for the whole part (see the module doc).
_SELECT_JSON = (
    f"SELECT json_group_array(json_array({_COLUMNS})) FROM suppression "  # noqa: S608
    f"WHERE {SUPPRESSION_PREFIX_SQL} IN ({{marks}})"
)
#: A batch is split in parts of at least this many keys, one per parallel connection.
PART_MIN_KEYS = 200
#: Entries added since the filter was built that a lookup reads and adds itself; more (a
#: large import meanwhile) and the filter is dropped, the builder's thread loading the saved
#: one and reading them there (or building anew), the lookups going to SQLite meanwhile.
CATCH_UP_MAX = 10_000
#: Seconds before a failed filter build is tried again.
RETRY_BUILD = 60.0
#: Seconds saving a built filter waits for the write lock (then gives up: it is still used).
SAVE_WAIT = 10.0


def _chunks(keys: Sequence[str]) -> list[tuple[list[str], str]]:
    """``keys`` in statements' worth (900 at most), each with its ``?,?,...`` placeholders."""
    if len(keys) <= _CHUNK:  # every relay lookup: one statement
        return [(list(keys), _marks(len(keys)))]
    parts = [list(keys[start : start + _CHUNK]) for start in range(0, len(keys), _CHUNK)]
    return [(part, _marks(len(part))) for part in parts]


@functools.lru_cache(maxsize=128)
def _marks(count: int) -> str:
    return ",".join("?" * count)


@functools.lru_cache(maxsize=256)
def _in_sql(template: str, marks: str) -> str:
    """``template`` with its ``{marks}`` or ``IN (?*)`` filled: the same text for the same
    count, built once (and sqlite3's statement cache finds it by that text)."""
    if "IN (?*)" in template:
        return template.replace("IN (?*)", f"IN ({marks})")
    return template.format(marks=marks)


def _connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
    con.execute("PRAGMA query_only = ON")
    return con


def _has_json(con: sqlite3.Connection) -> bool:
    """SQLite's JSON functions are built in since 3.38; older builds may lack them."""
    try:
        con.execute("SELECT json_group_array(json_array(1, 'a'))").fetchall()
    except sqlite3.OperationalError:
        return False
    return True


class SQLiteReader:
    """Read-only suppression queries on a SQLite file, outside SQLAlchemy."""

    def __init__(self, path: str, parallel: int | None = None, *, key_filter: bool = True) -> None:
        """Open the read-only connections on the SQLite file at ``path``.

        Args:
            path: the database file.
            parallel: connections (and threads) a large batch is split between; default
                ``min(2, os.cpu_count())``.
            key_filter: screen lookups with a key filter (see the module doc); ``False``:
                never build one, every key goes to SQLite.

        Raises:
            StoreError: the file cannot be opened.
        """
        count = min(2, os.cpu_count() or 1) if parallel is None else parallel
        if count < 1:
            raise ValueError("parallel must be at least 1")
        opened: list[sqlite3.Connection] = []
        try:
            # One connection, used from the loop thread or a worker thread, never both at once.
            for _ in range(1 + count):
                opened.append(_connect(path))
            self._json = _has_json(opened[0])
        except sqlite3.Error as exc:
            for con in opened:
                con.close()
            raise StoreError(f"opening the suppression reader: {exc}") from exc
        self._con, parts = opened[0], opened[1:]
        self._lock = threading.Lock()
        # Batch parts: each worker thread takes a free connection, so none is shared.
        self._parts: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        for con in parts:
            self._parts.put(con)
        self._part_cons = parts
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="prospect-mailer-read")
        self._path = path
        # The key filter (under self._lock), the thread building one, and when a build failed.
        self._filter: KeyFilter | None = None
        self._builder: threading.Thread | None = None
        self._built = threading.Event()  # set when no build is running
        self._built.set()
        self._stop = threading.Event()
        if not key_filter:
            self._stop.set()  # no build ever starts
        self._failed_at = -RETRY_BUILD

    @property
    def parallel(self) -> int:
        """How many parts (threads, connections) a large batch is split into at most."""
        return len(self._part_cons)

    def _select(self, con: sqlite3.Connection, keys: Sequence[str], aggregate: bool) -> list[Any]:
        rows: list[Any] = []
        try:
            for chunk, marks in _chunks(suppression_prefixes(keys)):
                if aggregate and self._json:
                    ((text,),) = con.execute(_in_sql(_SELECT_JSON, marks), chunk).fetchall()
                    rows += json.loads(text)
                else:
                    rows += con.execute(_in_sql(_SELECT, marks), chunk).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"suppression lookup failed: {exc}") from exc
        if len(keys) == 1:
            (key,) = keys
            return [row for row in rows if row[1] == key]
        wanted = set(keys)
        return [row for row in rows if row[1] in wanted]

    def _query(self, keys: Sequence[str]) -> list[Any]:
        with self._lock:
            # Row by row: for a few keys, cheaper than building and parsing JSON. Not
            # screened: for so few keys, reading the filter's state costs what it saves.
            return self._select(self._con, keys, aggregate=False)

    def _screen(self, keys: Sequence[str]) -> Sequence[str]:
        """The keys the filter cannot rule out, once it is brought up to date; all of them
        when there is no filter to use (none built yet, or just dropped). Under the lock.

        A state that cannot be read drops the filter: the keys go to SQLite, which answers
        or fails as it would without one.
        """
        screen = self._filter
        if screen is None:
            return keys
        try:
            state = read_state(self._con, screen.high)
            if not screen.lacks_only_newer(state) or state.high - screen.high > CATCH_UP_MAX:
                # Entries it cannot be told about by id, or many: built again (or the saved
                # one loaded and brought up to date) in the builder's thread.
                self._filter = None
                self._start_build()
                return keys
            screen.catch_up(self._con, state)
            if screen.full:
                self._start_build()  # still right meanwhile, only less selective
        except (sqlite3.Error, TypeError, ValueError) as exc:
            self._filter = None
            log.warning("suppression key filter dropped: its state cannot be read: %s", exc)
            return keys
        return screen.candidates(keys)

    def _start_build(self) -> None:
        """Build a new filter in a thread of its own, unless one is being built or the last
        build failed less than :data:`RETRY_BUILD` seconds ago. Under the lock."""
        if self._stop.is_set() or not self._built.is_set():
            return
        if time.monotonic() - self._failed_at < RETRY_BUILD:
            return
        self._built.clear()
        self._builder = threading.Thread(
            target=self._build, name="prospect-mailer-key-filter", daemon=True
        )
        self._builder.start()

    def _build(self) -> None:
        started = time.perf_counter()
        built: KeyFilter | None = None
        try:
            built, caught_up = self._load_or_build()
            if built is not None and (built.origin == "built" or caught_up > CATCH_UP_MAX):
                self._save(built)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            log.warning(
                "building the suppression key filter failed (lookups go to SQLite): %s", exc
            )
            with self._lock:
                self._failed_at = time.monotonic()
        if built is not None:
            with self._lock:
                if not self._stop.is_set():
                    self._filter = built
            log.info(
                "suppression key filter ready (%s): %d entries, %.1f MB, in %.1f s",
                built.origin,
                built.added,
                built.nbytes / 1e6,
                time.perf_counter() - started,
            )
        self._built.set()

    def _load_or_build(self) -> tuple[KeyFilter | None, int]:
        """The filter saved in the database brought up to date, if it still can be (it lacks
        only entries newer than it, and is not grown full); else one built from the list.
        Also returns how many ids the loaded one was behind.

        Raises:
            sqlite3.Error, TypeError, ValueError: the database failed, or its state is
                unreadable.
        """
        con = _connect(self._path)
        try:
            try:
                saved = load_filter(con)
            except sqlite3.Error as exc:  # no such table yet, an odd row: build instead
                log.warning("the saved suppression key filter cannot be read: %s", exc)
                saved = None
            # Read after it: the state of a saved filter is never above this one.
            state = read_state(con, saved.high if saved is not None else 0)
            if saved is not None and saved.lacks_only_newer(state):
                # Entries with an id above its high came after it, and only those (see
                # keyfilter.STATE_DDL); they are read and added, as a lookup would.
                behind = saved.catch_up(con, state)
                if not saved.full:
                    return saved, behind
            return build_filter(con, self._stop), 0
        finally:
            con.close()

    def _save(self, built: KeyFilter) -> None:
        """Save ``built`` for the next process; a failure only costs that process a build."""
        try:
            con = sqlite3.connect(self._path, timeout=SAVE_WAIT)
            try:
                save_filter(con, built, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            finally:
                con.close()
        except sqlite3.Error as exc:
            log.warning("saving the suppression key filter failed (it is still used): %s", exc)

    async def prepare(self) -> KeyFilter | None:
        """Build the key filter now if there is none, and wait for it (a first lookup only
        starts the build). Returns the filter in use, ``None`` if it could not be built."""
        with self._lock:
            if self._filter is None:
                self._failed_at = -RETRY_BUILD
                self._start_build()
        await asyncio.to_thread(self._built.wait)
        return self._filter

    @property
    def key_filter(self) -> KeyFilter | None:
        """The key filter in use, if any (tests, benchmarks)."""
        return self._filter

    def _query_part(self, keys: Sequence[str]) -> list[Any]:
        con = self._parts.get()
        try:
            return self._select(con, keys, aggregate=True)
        finally:
            self._parts.put(con)

    def _fetch(self, sql: str, params: Sequence[object]) -> list[Any]:
        with self._lock:
            try:
                return self._con.execute(sql, list(params)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading the store failed: {exc}") from exc

    async def fetch(self, sql: str, params: Sequence[object]) -> list[Any]:
        """Run one read-only query (``?`` placeholders; at most 900 parameters).

        Raises:
            StoreError: the database failed.
        """
        if len(params) <= INLINE_MAX_KEYS:
            return self._fetch(sql, params)
        return await asyncio.to_thread(self._fetch, sql, params)

    async def fetch_in(self, sql: str, params: Sequence[object], keys: Sequence[str]) -> list[Any]:
        """Run ``sql`` whose ``IN (?*)`` is expanded to one placeholder per key (900 at most
        a statement), with ``params`` bound before the keys; rows of every chunk.

        Only placeholders are ever spliced into the SQL text, never a value.

        Raises:
            StoreError: the database failed.
        """
        if "IN (?*)" not in sql:
            raise ValueError("fetch_in needs an 'IN (?*)' marker")
        rows: list[Any] = []
        for chunk, marks in _chunks(keys):
            rows += await self.fetch(_in_sql(sql, marks), [*params, *chunk])
        return rows

    async def lookup(self, keys: Sequence[str]) -> list[Any]:
        """Rows ``(kind, key_hash, scope, scope_value, reason, source, created_at)``.

        Raises:
            StoreError: the database failed (the caller fails closed).
        """
        if len(keys) <= INLINE_MAX_KEYS:
            return self._query(keys)
        with self._lock:
            if self._filter is None:
                self._start_build()  # for the next batches; this one goes to SQLite
            keys = self._screen(keys)
        if len(keys) <= INLINE_MAX_KEYS:
            return self._query(keys) if keys else []
        count = max(1, min(self.parallel, len(keys) // PART_MIN_KEYS))
        # Sorted, so that each part probes its own stretch of the index.
        ordered = sorted(keys)
        size = -(-len(ordered) // count)
        loop = asyncio.get_running_loop()
        try:
            jobs = [
                loop.run_in_executor(self._pool, self._query_part, ordered[i : i + size])
                for i in range(0, len(ordered), size)
            ]
        except RuntimeError as exc:  # the pool is shut down: the reader was closed
            raise StoreError("suppression lookup failed: the store is closed") from exc
        parts = await asyncio.gather(*jobs)
        return [row for part in parts for row in part]

    def set_trace(self, callback: Callable[[str], object] | None) -> None:
        """Call ``callback(statement)`` for each SQL statement run (tests, debugging)."""
        with self._lock:
            self._con.set_trace_callback(callback)
        for con in self._part_cons:
            con.set_trace_callback(callback)

    def close(self) -> None:
        """Close the connections (waiting for a batch part still running, and stopping a
        filter build)."""
        self._stop.set()
        builder = self._builder
        if builder is not None:
            builder.join()
        self._pool.shutdown(wait=True)
        with self._lock:
            self._con.close()
        for con in self._part_cons:
            con.close()
