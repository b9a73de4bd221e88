"""A direct write path on SQLite for the per-send hot path: claims and audit records.

Through SQLAlchemy's async layer each statement costs a few hundred microseconds of CPU (SQL
compilation, a greenlet switch, a hop to aiosqlite's thread and back), and a send needs four
transactions of them (claim, ``pending`` record, claim finish, final record). This writer keeps
one stdlib ``sqlite3`` connection in a dedicated thread and runs each group commit as one
function there: ``BEGIN IMMEDIATE`` (the database write lock, as the ORM path takes it), the
statements, ``COMMIT``. The result of a send (claim finish *and* its audit record) is one
transaction instead of two.

The rows written are exactly those of the ORM path (same columns, same stored forms: the audit
``created_at`` ISO string that was hashed, SQLAlchemy's SQLite ``DATETIME`` text for
``updated_at``), so either path reads what the other wrote, and several processes, some on
each path, may share one file: the database lock and the unique constraints decide, as before.

Same PRAGMAs as every other connection (:data:`~prospect_mailer.store.engine.SQLITE_PRAGMAS`):
WAL, ``synchronous=FULL``, except SQLite's busy handler, which is off on this connection: it
sleeps 1, 2, 5, 10, 15, 20, 25... ms between attempts, so two processes committing hundreds of
times a second (relay workers, a relay beside a ``send_many``) would spend most of their time
asleep with the lock free. ``BEGIN IMMEDIATE`` is retried here instead, every 0.1 ms at first
and at most every 2 ms, for the store's 10 s. Once it holds the write lock, no statement of the
transaction waits for another connection in WAL mode (the checkpoint after ``COMMIT`` is a
passive one, which never does).

Plus ``temp_store=MEMORY``: the statement journals of a savepoint or a multi-row statement
stay in memory instead of a temporary file created, written and unlinked in each transaction
(about 8 writes and 3 file operations a relayed message; the writer process's system CPU fell
by 100-170 µs a message, three alternating pairs).

Each statement is a round trip for the GIL: sqlite3 releases it while SQLite works, and the
writer thread then waits to take it back from the event loop. So a transaction runs as few
statements as it can, whatever the number of sends in it: the claims in one multi-row
``INSERT``, the results in one ``UPDATE ... FROM (VALUES ...)``, the audit records in one
multi-row ``INSERT`` (in statements of at most 500 rows). Measured through the relay (2 KB
messages, 10 sessions, 4,000 messages, six interleaved pairs against the per-row statements):
12 statements a transaction down to 7, its wall time 1.7-2.4 down to 1.6-1.9 ms (p50), futex
calls per message 20.0 down to 17.4 and fcntl 10.9 down to 7.9 (``bench.threads --strace``);
msgs/s moved by less than this VM's noise (means 554 against 544).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from ..errors import InvalidInputError, StoreError
from .audit_records import EventSource, built, chain_rows
from .engine import SQLITE_PRAGMAS, WRITE_LOCK_WAIT
from .pickling import plain_pickle

if TYPE_CHECKING:
    from .audit_records import AuditEvent
    from .claims import ClaimRequest, ClaimResult, FinishRequest

__all__ = ["SQLiteWriter", "SendsCommit", "sqlite_datetime"]

T = TypeVar("T")

_RETRYABLE = ("failed", "deferred")
_AUDIT_COLUMNS = (
    "seq", "event_id", "send_id", "created_at", "kind", "status", "campaign_id", "step",
    "advertiser_id", "purpose", "recipient_hash", "recipient_masked", "message_id", "transport",
    "rule_ids", "details", "prev_hash", "hash",
)  # fmt: skip
#: ``UPDATE ... FROM`` is SQLite 3.33's; older builds finish claims one statement each.
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
#: Rows a multi-row statement holds at most (18 parameters a row for the audit records: well
#: under SQLite's 32,766).
_ROWS_PER_STATEMENT = 500
_INSERT_AUDIT_HEAD = f"INSERT INTO audit_events ({', '.join(_AUDIT_COLUMNS)}) VALUES"
_AUDIT_ROW = f"({', '.join('?' * len(_AUDIT_COLUMNS))})"
_INSERT_CLAIMS_HEAD = (
    "INSERT INTO send_claims (campaign_id, step, recipient_hash, message_key, advertiser_id,"
    " status, send_id, message_id, updated_at) VALUES"
)
_CLAIM_ROW = "(?, ?, ?, ?, ?, 'pending', ?, NULL, ?)"
# The results of many sends in one statement, each row matched on its claim's unique key (the
# index uq_send_claims_key serves each) and its send id. SQLite names a VALUES list's columns
# column1, column2...; the statement must begin with UPDATE for sqlite3 to report its rowcount.
_FINISH_MANY_HEAD = (
    "UPDATE send_claims SET status = v.column1, message_id = v.column2, updated_at = ? FROM (VALUES"
)
_FINISH_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_FINISH_MANY_TAIL = (
    ") AS v WHERE send_claims.campaign_id = v.column3 AND send_claims.step = v.column4"
    " AND send_claims.recipient_hash = v.column5 AND send_claims.message_key = v.column6"
    " AND send_claims.send_id = v.column7"
)
_KEY = "campaign_id = ? AND step = ? AND recipient_hash = ? AND message_key = ?"
_CURRENT_CLAIM = f"SELECT status, send_id, message_id FROM send_claims WHERE {_KEY}"  # noqa: S608
_TAKE_OVER = (
    "UPDATE send_claims SET status = 'pending', send_id = ?, message_id = NULL,"  # noqa: S608
    f" advertiser_id = ?, updated_at = ? WHERE {_KEY} AND send_id = ? AND status = ?"
)
_FINISH = (
    "UPDATE send_claims SET status = ?, message_id = ?, updated_at = ?"  # noqa: S608
    f" WHERE {_KEY} AND send_id = ?"
)


def sqlite_datetime(value: datetime) -> str:
    """The text SQLAlchemy's SQLite ``DateTime`` type stores for ``value`` (in UTC)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _begin_immediate(con: sqlite3.Connection, timeout: float = WRITE_LOCK_WAIT) -> None:
    """``BEGIN IMMEDIATE``, retried while another connection holds the write lock.

    ``con`` should have SQLite's busy handler off (``busy_timeout=0``, as the writer's
    connection has): otherwise each attempt first waits in SQLite's own sleeps.

    Raises:
        sqlite3.OperationalError: any other error, or still locked after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        try:
            con.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


def _rows_sql(head: str, row: str, count: int, tail: str = "") -> str:
    """``head`` followed by ``count`` copies of the placeholder tuple ``row``, then ``tail``
    (only placeholders are spliced in, never a value)."""
    return f"{head} {', '.join([row] * count)}{tail}"


def _insert_claims(count: int) -> str:
    """The INSERT of ``count`` claims, each skipped if its key is already claimed."""
    return _rows_sql(_INSERT_CLAIMS_HEAD, _CLAIM_ROW, count, " ON CONFLICT DO NOTHING")


def _claim_params(r: ClaimRequest, stamp: str) -> tuple[object, ...]:
    """One claim's parameters, in the order of :data:`_CLAIM_ROW`."""
    return (
        r.campaign_id,
        r.step,
        r.recipient_hash,
        r.message_key,
        r.advertiser_id,
        r.send_id,
        stamp,
    )


def _chunks(items: Sequence[T], con: sqlite3.Connection, per_row: int) -> list[Sequence[T]]:
    """``items`` in statements' worth: at most 500 rows, and within this SQLite's limit on
    parameters (32,766 since 3.32; 999 in older builds) at ``per_row`` parameters a row
    (one more for the statement's own)."""
    limit = con.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 1
    size = max(1, min(_ROWS_PER_STATEMENT, limit // per_row))
    return [items[i : i + size] for i in range(0, len(items), size)]


class SQLiteWriter:
    """Claims and audit appends on a SQLite file through one stdlib connection and thread.

    Args:
        path: the database file (it must exist, with the schema: open it with
            :meth:`~prospect_mailer.store.Store.open`, which creates this writer).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._con: sqlite3.Connection | None = None
        self._closed = False
        # One thread: the connection is only ever used from it, one transaction at a time.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pm-sqlite-writer")
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                for name, value in SQLITE_PRAGMAS:
                    con.execute(f"PRAGMA {name}={value}")
                con.execute("PRAGMA busy_timeout=0")  # _begin_immediate polls instead
                # Statement journals (a savepoint, a multi-row statement that may fail
                # half-way) in memory: on disk each transaction created, wrote and unlinked
                # a temporary file in /var/tmp, about 8 writes a relayed message. Only this
                # connection's small transactions use them; durability is the WAL's.
                con.execute("PRAGMA temp_store=MEMORY")
            except sqlite3.Error:
                con.close()
                raise
            self._con = con
        return self._con

    def open(self) -> None:
        """Open the connection now rather than at the first transaction.

        Raises:
            StoreError: the database cannot be opened.
        """
        with self._lock:
            try:
                self._connection()
            except sqlite3.Error as exc:
                raise StoreError(f"opening {self._path} failed: {exc}") from exc

    def transaction(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction in the calling thread (the writer
        thread, through :meth:`run`, or the writer process's loop).

        Raises:
            StoreError: the database failed or the writer is closed (nothing is written).
        """
        with self._lock:
            if self._closed:
                raise StoreError(f"{what} failed: the store is closed")
            try:
                con = self._connection()
                _begin_immediate(con)
                try:
                    result = work(con)
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            return result

    async def run(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` in one transaction in the writer thread.

        Raises:
            StoreError: the database failed or the writer is closed (nothing is written).
        """
        if self._closed:
            raise StoreError(f"{what} failed: the store is closed")
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._pool, self.transaction, what, work)
        except RuntimeError as exc:  # closed between the check above and now
            raise StoreError(f"{what} failed: the store is closed") from exc
        return await job

    def close(self) -> None:
        """Close the connection once the running transaction (if any) ends. Idempotent."""
        with self._lock:
            self._closed = True
            if self._con is not None:
                self._con.close()
                self._con = None
        self._pool.shutdown(wait=False)


# -- the statements (run in the writer thread, inside SQLiteWriter.transaction) -------------------


@plain_pickle
@dataclass(frozen=True, slots=True)
class SendsCommit:
    """The group commit of the send pipeline as one transaction's work (see
    :meth:`~prospect_mailer.store.Store.commit_sends`): the results (claims finished, their
    records), then the claims under a savepoint, then every record in one append.

    Plain data and a call, so that a writer may run it in its own thread or process (pickled).
    Returns ``(claim results, the claims' error, the results' error)``: an error of one kind
    (a database error in the claims, a malformed record) leaves the other kind committed.
    """

    claims: list[ClaimRequest]
    record: Callable[[list[ClaimResult]], Sequence[AuditEvent]]
    finishes: list[FinishRequest]
    finish_events: list[EventSource]  # built here if calls
    refused: bool  # the claims were refused before: none is written, nor their records
    now: datetime

    def __call__(
        self, con: sqlite3.Connection
    ) -> tuple[list[ClaimResult], Exception | None, Exception | None]:
        # Each kind's records are built under its own guard: a malformed record (say details
        # over the size limit) fails its own kind, never the other one.
        rows: list[dict[str, object]] = []
        unfinished: Exception | None = None
        if self.finishes:
            try:
                rows = [built(e)._row() for e in self.finish_events]
            except InvalidInputError as exc:
                unfinished = exc
            else:
                finish_many(con, self.finishes, self.now)
        done: list[ClaimResult] = []
        failed: Exception | None = None
        if not self.refused:
            isolated = bool(self.finishes)  # results in this transaction: keep them apart
            if isolated:
                con.execute("SAVEPOINT claims")
            try:
                done = claim_many(con, self.claims, self.now) if self.claims else []
                # The claims' records (or those of a chunk that claimed nothing: all its
                # recipients were blocked).
                rows += [e._row() for e in self.record(done)]
            except (sqlite3.Error, InvalidInputError) as exc:
                if not isolated:
                    raise
                con.execute("ROLLBACK TO claims")
                done, failed = [], exc
        if rows:
            append_audit(con, rows)
        return done, failed, unfinished


def append_audit(
    con: sqlite3.Connection, rows: Sequence[dict[str, object]]
) -> list[dict[str, object]]:
    """Chain ``rows`` (from ``AuditEvent._row``) after the head, insert them, move the head."""
    found = con.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
    if found is None:
        raise StoreError("appending to the audit log failed: the chain head is missing")
    full = chain_rows(int(found[0]), str(found[1]), rows)
    for part in _chunks(full, con, len(_AUDIT_COLUMNS)):
        con.execute(
            _rows_sql(_INSERT_AUDIT_HEAD, _AUDIT_ROW, len(part)),
            [r[c] for r in part for c in _AUDIT_COLUMNS],
        )
    last = full[-1]
    con.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (last["seq"], last["hash"]))
    return full


def claim_many(
    con: sqlite3.Connection, requests: Sequence[ClaimRequest], now: datetime
) -> list[ClaimResult]:
    """Claim each request (no ``force``); see :meth:`SendClaims.claim_many` for the rules.

    Nearly always every claim is new: all of them go in one multi-row ``INSERT ... ON CONFLICT
    DO NOTHING`` (per 500), which inserted them all when its row count says so. Otherwise (a
    duplicate, a retry taking over) that is rolled back to a savepoint and each request is
    claimed in turn, as :func:`_claim_each` says.
    """
    from .claims import ClaimResult

    stamp = sqlite_datetime(now)
    keys = {(r.campaign_id, r.step, r.recipient_hash, r.message_key) for r in requests}
    if len(keys) == len(requests):  # no key twice in the batch
        con.execute("SAVEPOINT claim_many")
        inserted = 0
        for part in _chunks(requests, con, 7):
            params = [value for r in part for value in _claim_params(r, stamp)]
            cursor = con.execute(_insert_claims(len(part)), params)
            inserted += cursor.rowcount
            if cursor.rowcount != len(part):
                break
        # The savepoint is left open (one statement less): COMMIT or ROLLBACK ends it.
        if inserted == len(requests):
            return [ClaimResult(claimed=True) for _ in requests]
        con.execute("ROLLBACK TO claim_many")
    return _claim_each(con, requests, stamp)


def _claim_each(
    con: sqlite3.Connection, requests: Sequence[ClaimRequest], stamp: str
) -> list[ClaimResult]:
    """Claim the requests one by one: a new key is claimed; the same key twice in the batch is
    claimed by its first occurrence; an existing claim that failed or was deferred is taken
    over (a retry); any other existing claim is a duplicate, reported with its status."""
    from .claims import ClaimResult

    owners: dict[tuple[str, int, str, str], ClaimRequest] = {}
    results: list[ClaimResult] = []
    for r in requests:
        key = (r.campaign_id, r.step, r.recipient_hash, r.message_key)
        owner = owners.setdefault(key, r)
        if owner is not r:
            # The same key twice in one batch: the first occurrence holds the claim.
            results.append(
                ClaimResult(
                    claimed=False, existing_status="pending", existing_send_id=owner.send_id
                )
            )
            continue
        cursor = con.execute(_insert_claims(1), _claim_params(r, stamp))
        if cursor.rowcount == 1:
            results.append(ClaimResult(claimed=True))
            continue
        seen = con.execute(_CURRENT_CLAIM, key).fetchone()
        if seen is None:  # cannot happen under the write lock; be conservative
            results.append(ClaimResult(claimed=False))
            continue
        status, send_id, message_id = seen
        if status in _RETRYABLE:
            took = con.execute(
                _TAKE_OVER, (r.send_id, r.advertiser_id, stamp, *key, send_id, status)
            )
            if took.rowcount == 1:
                results.append(
                    ClaimResult(
                        claimed=True,
                        existing_status=status,
                        existing_send_id=send_id,
                        existing_message_id=message_id,
                        taken_over=True,
                    )
                )
                continue
        results.append(
            ClaimResult(
                claimed=False,
                existing_status=status,
                existing_send_id=send_id,
                existing_message_id=message_id,
            )
        )
    return results


def finish_many(con: sqlite3.Connection, requests: Sequence[FinishRequest], now: datetime) -> int:
    """Finish each claim held by its ``send_id``; returns how many matched.

    One ``UPDATE ... FROM (VALUES ...)`` per 500 requests; a batch finishing one claim twice
    (which the pipeline never sends) is run request by request, so that the last one wins as
    it always did, and so is every batch on a SQLite older than 3.33.
    """
    stamp = sqlite_datetime(now)
    keys = {(r.campaign_id, r.step, r.recipient_hash, r.message_key, r.send_id) for r in requests}
    if len(keys) != len(requests) or not _UPDATE_FROM:
        return sum(_finish_one(con, r, stamp) for r in requests)
    matched = 0
    for part in _chunks(requests, con, 7):
        params: list[object] = []
        for r in part:
            params += (r.status, r.message_id, r.campaign_id, r.step)
            params += (r.recipient_hash, r.message_key, r.send_id)
        sql = _rows_sql(_FINISH_MANY_HEAD, _FINISH_ROW, len(part), _FINISH_MANY_TAIL)
        matched += con.execute(sql, [stamp, *params]).rowcount
    return matched


def _finish_one(con: sqlite3.Connection, r: FinishRequest, stamp: str) -> int:
    key = (r.campaign_id, r.step, r.recipient_hash, r.message_key)
    cursor = con.execute(_FINISH, (r.status, r.message_id, stamp, *key, r.send_id))
    return 1 if cursor.rowcount == 1 else 0
