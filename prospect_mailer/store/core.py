"""The :class:`Store`: one async engine and the four parts that share it.

``Store.open`` creates the schema if needed, idempotently and safely when several processes
open the same database at once (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-level
advisory lock, DDL being transactional there). A database written by a newer prospect-mailer
(higher ``schema_version``) is refused rather than modified.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType

from sqlalchemy import Connection, inspect, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlmodel import SQLModel

from ..errors import InvalidInputError, StoreError
from . import fastwrite
from .audit import AuditLog
from .audit_records import AuditEvent, AuditRecord, EventSource, built
from .campaigns import CampaignStore
from .claims import (
    ClaimRequest,
    ClaimResult,
    FinishRequest,
    SendClaims,
    check_claim_requests,
    check_finish_requests,
)
from .engine import Database, create_engine, parse_url
from .fastread import SQLiteReader
from .fastwrite import SQLiteWriter
from .keyfilter import FILTER_COLUMNS, STATE_COLUMNS, STATE_DDL, STATE_TRIGGERS
from .prospects import ProspectRegistry
from .suppression import SuppressionList
from .tables import AUDIT_HEAD, SCHEMA_VERSION, STORE_TABLES, SUPPRESSION
from .writer_process import ProcessWriter

__all__ = ["CURRENT_SCHEMA_VERSION", "Store"]

log = logging.getLogger("prospect_mailer.store")

#: The schema version this code creates and understands.
#: 1: the first schema. 2: the suppression lookup index covers every column a lookup reads
#: (``ix_suppression_lookup``, replacing ``ix_suppression_key_hash``). 3: that index is
#: replaced by one on the key's first 16 hex digits (``ix_suppression_prefix``). 4: SQLite
#: keeps ``suppression_state`` by triggers, so that a reader's key filter can be kept exact
#: (:mod:`~prospect_mailer.store.keyfilter`); nothing changes on PostgreSQL.
CURRENT_SCHEMA_VERSION = 4

#: Seconds an open waits for another process creating or upgrading the schema (SQLite).
SCHEMA_LOCK_WAIT = 900.0

# Arbitrary constant naming "prospect-mailer schema creation" among advisory locks.
_PG_SCHEMA_LOCK = 0x706D5F736368656D & 0x7FFFFFFFFFFFFFFF


def _read_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table(SCHEMA_VERSION.name):
        return None
    row = conn.execute(select(SCHEMA_VERSION.c.version).where(SCHEMA_VERSION.c.id == 1)).first()
    return None if row is None else int(row[0])


def _create_tables(conn: Connection) -> None:
    SQLModel.metadata.create_all(conn, tables=list(STORE_TABLES), checkfirst=True)


def _migrate_1_to_2(conn: Connection) -> None:
    """Version 2 replaced the key-only suppression index by a covering one, which version 3
    replaces in turn: the key-only index goes, and the step to 3 creates what replaces both
    (the steps run in one transaction, so version 2's index is never built for nothing)."""
    conn.execute(text("DROP INDEX IF EXISTS ix_suppression_key_hash"))


def _migrate_2_to_3(conn: Connection) -> None:
    """Replace the covering suppression index (about 170 bytes an entry) by the key-prefix
    one (about 27): about 20 s and 1.4 GB less a 10M list on SQLite."""
    prefix = next(i for i in SUPPRESSION.indexes if i.name == "ix_suppression_prefix")
    prefix.create(conn, checkfirst=True)
    conn.execute(text("DROP INDEX IF EXISTS ix_suppression_lookup"))


def _migrate_3_to_4(conn: Connection) -> None:
    """Version 4's ``suppression_state`` is created (SQLite) at every open by
    :func:`_suppression_state`, which also repairs it: nothing more to do."""


#: ``version -> step`` bringing a database from ``version`` to ``version + 1``.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
}


def _suppression_state(conn: Connection) -> None:
    """SQLite: create ``suppression_state``, its triggers and ``suppression_filter`` if
    missing (the state starts at the list's highest id, with an epoch of its own, so that no
    filter of an earlier state is ever used). Repairs what it finds amiss: a table of an
    older layout is created again; a trigger missing beside an existing state (dropped by
    hand: changes may have gone uncounted) is recreated and the state given a new epoch, so
    every reader's key filter is built again."""

    def columns(table: str) -> tuple[str, ...]:
        return tuple(str(r[1]) for r in conn.execute(text(f"PRAGMA table_info({table})")))

    renewed = False
    for table, wanted in (
        ("suppression_state", STATE_COLUMNS),
        ("suppression_filter", FILTER_COLUMNS),
    ):
        found = columns(table)
        if found and found != wanted:
            conn.execute(text(f"DROP TABLE {table}"))
            renewed = True
    triggers = {
        str(name)
        for (name,) in conn.execute(
            text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'suppression'"
            )
        )
    }
    for old in sorted(t for t in triggers if t.startswith("suppression_state_")):
        if old not in STATE_TRIGGERS:
            conn.execute(text(f'DROP TRIGGER "{old}"'))
    had_state = bool(columns("suppression_state"))
    for statement in STATE_DDL:
        conn.execute(text(statement))
    if renewed:
        log.warning("suppression_state of an older layout: created again, key filters rebuilt")
    elif had_state and not triggers.issuperset(STATE_TRIGGERS):
        log.warning("suppression_state triggers were missing: recreated, key filters rebuilt")
        conn.execute(
            text(
                "UPDATE suppression_state SET epoch = lower(hex(randomblob(16))), "
                "high = max(high, (SELECT coalesce(max(id), 0) FROM suppression)) WHERE id = 1"
            )
        )


async def _ensure_schema(db: Database, conn: AsyncConnection) -> None:
    # SQLite: the transaction already holds the write lock (taken before looking: two
    # processes creating the file at once would otherwise both see no table and both try to
    # create it). PostgreSQL: DDL is transactional; an advisory lock serialises the openers.
    if db.dialect != "sqlite":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
    found = await conn.run_sync(_read_version)
    if found is not None and found > CURRENT_SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {found}, newer than this prospect-mailer "
            f"understands ({CURRENT_SCHEMA_VERSION}): upgrade prospect-mailer"
        )
    await conn.run_sync(_create_tables)
    now = datetime.now(UTC)
    if found is None:
        await conn.execute(
            db.insert(SCHEMA_VERSION)
            .values(id=1, version=CURRENT_SCHEMA_VERSION, updated_at=now)
            .on_conflict_do_nothing()
        )
    else:
        # One step at a time, in the same transaction as the version update: a failed or
        # interrupted migration leaves the database at its old version, unchanged.
        for version in range(found, CURRENT_SCHEMA_VERSION):
            log.warning(
                "migrating the store schema from version %d to %d (once; it may take a "
                "minute on a large suppression list)",
                version,
                version + 1,
            )
            await conn.run_sync(_MIGRATIONS[version])
        if found < CURRENT_SCHEMA_VERSION:
            await conn.execute(
                update(SCHEMA_VERSION)
                .where(SCHEMA_VERSION.c.id == 1)
                .values(version=CURRENT_SCHEMA_VERSION, updated_at=now)
            )
    await conn.execute(
        db.insert(AUDIT_HEAD).values(id=1, seq=0, hash="0" * 64).on_conflict_do_nothing()
    )
    if db.dialect == "sqlite":
        # After the migrations: one that rebuilt the suppression table would take its
        # triggers with it.
        await conn.run_sync(_suppression_state)


class Store:
    """The database of prospect-mailer: suppression list, audit log, send claims, prospects.

    Open with ``store = await Store.open(url)`` and ``await store.close()``, or
    ``async with await Store.open(url) as store``, or ``async with Store.connect(url) as
    store``. Safe to share between tasks; several processes may open the same database.

    Attributes:
        suppression: the suppression list (:class:`SuppressionList`).
        audit: the hash-chained audit log (:class:`AuditLog`).
        claims: the send claims, i.e. idempotency keys (:class:`SendClaims`).
        prospects: the prospect registry (:class:`ProspectRegistry`).
        campaigns: the campaigns registered for the SMTP relay (:class:`CampaignStore`).
        url: the database URL, password hidden.
    """

    def __init__(
        self,
        db: Database,
        url: URL,
        reader: SQLiteReader | None = None,
        writer: SQLiteWriter | None = None,
        sends_writer: ProcessWriter | None = None,
    ) -> None:
        """Wrap an opened database; use :meth:`open` instead."""
        self._db = db
        self._sends_writer = sends_writer
        self.url = url.render_as_string(hide_password=True)
        self._reader = reader
        self._writer = writer
        self.suppression = SuppressionList(db, reader)
        self.audit = AuditLog(db, writer)
        self.claims = SendClaims(db, reader, writer)
        self.prospects = ProspectRegistry(db, reader)
        self.campaigns = CampaignStore(db, reader)

    @classmethod
    async def open(
        cls,
        url: str | os.PathLike[str],
        *,
        schema: str | None = None,
        connect_timeout: float = 5.0,
        pool_size: int = 10,
        echo: bool = False,
        key_filter: bool = True,
        writer_process: bool = False,
    ) -> Store:
        """Connect to ``url`` and create or check the schema.

        Args:
            url: ``sqlite+aiosqlite:///path/file.db``, a bare file path (SQLite), or
                ``postgresql+asyncpg://user@host:port/db``.
            schema: PostgreSQL only: the schema to use (sets ``search_path``; it must exist).
            connect_timeout: seconds to wait for a PostgreSQL connection.
            pool_size: PostgreSQL connections kept open (as many again may overflow).
            echo: log every SQL statement (debugging).
            key_filter: SQLite file: screen suppression lookups with an in-memory filter
                of the list's keys (:mod:`~prospect_mailer.store.keyfilter`: 20 bits an
                entry, 25 MB for 10,000,000); ``False`` spares that memory, every key then
                going to SQLite.
            writer_process: SQLite file: run the send pipeline's group commits (claims,
                results and their audit records) in a child process
                (:mod:`~prospect_mailer.store.writer_process`), off the event loop's GIL: the
                relay's setting ``writer = "process"``. No effect on other databases.

        Raises:
            ConfigError: the URL or schema name is not usable.
            StoreError: the database cannot be reached or created, or has a newer schema.
        """
        parsed = parse_url(url)
        db = Database(
            create_engine(
                parsed,
                schema=schema,
                connect_timeout=connect_timeout,
                pool_size=pool_size,
                echo=echo,
            )
        )
        reader: SQLiteReader | None = None
        writer: SQLiteWriter | None = None
        try:
            # Another process may be creating or upgrading the schema (a migration of a large
            # suppression list holds the lock about 30 s per 10M entries): wait for it.
            async with db.transaction(
                f"opening the store at {parsed.render_as_string()}",
                lock_wait=SCHEMA_LOCK_WAIT,
                waiting="another process is creating or upgrading its schema",
            ) as conn:
                await _ensure_schema(db, conn)
            # SQLite file: the per-send hot path reads and writes through its own stdlib
            # connections (fastread, fastwrite), off SQLAlchemy.
            direct = (
                parsed.get_backend_name() == "sqlite"
                and parsed.database
                and parsed.database != ":memory:"
                and not parsed.database.startswith("file:")
            )
            reader = (
                SQLiteReader(parsed.database, key_filter=key_filter)
                if direct and parsed.database
                else None
            )
            writer = SQLiteWriter(parsed.database) if direct and parsed.database else None
            sends_writer = (
                await ProcessWriter.start(parsed.database)
                if writer_process and direct and parsed.database
                else None
            )
        except BaseException:
            if reader is not None:
                reader.close()
            if writer is not None:
                writer.close()
            await db.engine.dispose()
            raise
        return cls(db, parsed, reader, writer, sends_writer)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str | os.PathLike[str],
        *,
        schema: str | None = None,
        connect_timeout: float = 5.0,
        pool_size: int = 10,
        echo: bool = False,
        key_filter: bool = True,
        writer_process: bool = False,
    ) -> AsyncIterator[Store]:
        """``async with Store.connect(url) as store``: :meth:`open`, then :meth:`close`.

        Arguments and errors are those of :meth:`open`.
        """
        store = await cls.open(
            url,
            schema=schema,
            connect_timeout=connect_timeout,
            pool_size=pool_size,
            echo=echo,
            key_filter=key_filter,
            writer_process=writer_process,
        )
        try:
            yield store
        finally:
            await store.close()

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.dialect

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine (for maintenance and tests; not a stable API)."""
        return self._db.engine

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` was called."""
        return self._db.closed

    async def close(self) -> None:
        """Close every connection. Idempotent; later calls on the store raise StoreError."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self.suppression.reader = None
            self.claims.reader = None
            self.prospects.reader = None
            self.campaigns.reader = None
        if self._sends_writer is not None:
            await self._sends_writer.close()
            self._sends_writer = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.audit.direct = None
            self.claims.direct = None
        if not self._db.closed:
            await self._db.dispose()

    async def claim_and_record(
        self,
        requests: Sequence[ClaimRequest],
        record: Callable[[list[ClaimResult]], Sequence[AuditEvent]],
        *,
        force: bool = False,
        records: bool = True,
    ) -> tuple[list[ClaimResult], list[AuditRecord]]:
        """Claim sends and append the audit records that follow from the claims' results.

        ``record(results)`` gets the claim results (in the order of ``requests``) and returns
        the events to append: ``pending`` for the claims won, ``duplicate`` for the others,
        and any other events of the batch. On a SQLite file both go in one transaction, so a
        claim never exists without its record (a crash leaves both or neither); elsewhere the
        claims are committed first, then the records. ``record`` must not block or await: on
        SQLite it runs in the store's writer thread, inside the transaction. ``force``: take
        over any claim (see :meth:`SendClaims.claim_many`; claims first, then records).
        ``records=False``: return no records (an empty list) where building them back from the
        stored rows can be skipped (the SQLite direct path: the send pipeline's hot path).

        Raises:
            InvalidInputError: a malformed request or event (nothing is written).
            StoreError: the database failed (nothing is written).
        """
        if self.claims.direct is not None and not self._db.closed and not force:
            check_claim_requests(requests)
            now = datetime.now(UTC)

            def work(con: sqlite3.Connection) -> tuple[list[ClaimResult], list[dict[str, object]]]:
                results = fastwrite.claim_many(con, requests, now)
                rows = [e._row() for e in record(results)]
                return results, (fastwrite.append_audit(con, rows) if rows else [])

            results, full = await self.claims.direct.run("claiming sends", work)
            return results, [AuditRecord._from_row(r) for r in full] if records else []
        results = await self.claims.claim_many(requests, force=force) if requests else []
        return results, await self.audit.append(record(results))

    async def commit_sends(
        self,
        claims: Sequence[ClaimRequest],
        record: Callable[[list[ClaimResult]], Sequence[AuditEvent]],
        finishes: Sequence[FinishRequest],
        finish_events: Sequence[EventSource],
    ) -> tuple[list[ClaimResult] | Exception, Exception | None]:
        """Record the results of sends and claim new ones, together: the send pipeline's group
        commit, which takes whatever both kinds of caller queued meanwhile.

        On a SQLite file (the direct write path) this is one transaction, one ``fsync``: the
        results (claims finished), then the claims under a savepoint, then every record in one
        append. A database error in the claims is rolled back alone: the results are still
        committed, and the error is returned for the claims' callers. An error in the results
        or in the records fails both. Elsewhere: :meth:`finish_sends`, then
        :meth:`claim_and_record` (the claims' records are returned by neither: ``records=False``).

        A result's record may be given as a call that builds it (the pipeline's
        ``PlannedEvent``): it is then built where it is written, in the writer process when
        there is one, off the caller's event loop.

        Returns:
            ``(claim results in order, or the error that claimed nothing; the results' error,
            or None)``. Malformed requests are reported there too, for their own kind only.
        """
        claim_error: Exception | None = None
        finish_error: Exception | None = None
        try:
            check_claim_requests(claims)
        except InvalidInputError as exc:
            claims, claim_error = [], exc
        try:
            check_finish_requests(finishes)
        except InvalidInputError as exc:
            finishes, finish_events, finish_error = [], [], exc
        refused = claim_error is not None  # nothing of the claims' kind is written
        results: list[ClaimResult] = []
        writer: SQLiteWriter | ProcessWriter | None = self._sends_writer or self.claims.direct
        if writer is not None and not self._db.closed:
            now = datetime.now(UTC)

            work = fastwrite.SendsCommit(
                list(claims), record, list(finishes), list(finish_events), refused, now
            )
            try:
                results, failed, unfinished = await writer.run("recording sends", work)
            except (StoreError, InvalidInputError) as exc:
                # Nothing of this transaction was written.
                return (claim_error or exc), (finish_error or (exc if finishes else None))
            if isinstance(failed, sqlite3.Error):
                failed = StoreError(f"claiming sends failed: {type(failed).__name__}: {failed}")
            return (claim_error or failed or results), (finish_error or unfinished)
        if finishes:
            try:
                result_records = [built(e) for e in finish_events]
                await self.finish_sends(finishes, result_records, records=False)
            except (StoreError, InvalidInputError) as exc:
                finish_error = exc
        try:
            if claims:
                results, _ = await self.claim_and_record(claims, record, records=False)
            elif not refused and (events := record([])):  # all the chunk's recipients blocked
                await self.audit.append(events)
        except (StoreError, InvalidInputError) as exc:
            claim_error = claim_error or exc
        return (claim_error or results), finish_error

    async def finish_sends(
        self,
        requests: Sequence[FinishRequest],
        events: Sequence[AuditEvent],
        *,
        records: bool = True,
    ) -> list[AuditRecord]:
        """Record the results of sends: finish their claims and append their audit records.

        One transaction on a SQLite file (the direct write path), two elsewhere (claims first:
        a crash between them leaves a finished claim whose record is missing, which
        ``audit export --unresolved`` does not hide, rather than a record of a claim still
        ``pending``). ``records=False``: as for :meth:`claim_and_record`.

        Raises:
            InvalidInputError: a malformed request or event (nothing is written).
            StoreError: the database failed.
        """
        if self.claims.direct is not None and not self._db.closed:
            check_finish_requests(requests)
            now = datetime.now(UTC)

            def work(con: sqlite3.Connection) -> list[dict[str, object]]:
                # The rows (details JSON, masking) are built in the writer thread, as for
                # claim_and_record: the event loop's thread is the relay's bottleneck.
                rows = [e._row() for e in events]
                fastwrite.finish_many(con, requests, now)
                return fastwrite.append_audit(con, rows)

            full = await self.claims.direct.run("recording send results", work)
            return [AuditRecord._from_row(r) for r in full] if records else []
        await self.claims.finish_many(requests)
        return await self.audit.append(events)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Store {self.url} ({state})>"
