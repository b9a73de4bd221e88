"""Engine creation, database URLs and the translation of foreign errors into StoreError.

Two back-ends:

* **SQLite** (``sqlite+aiosqlite:///path/file.db``, or a bare file path): the embedded default.
  Every connection gets ``journal_mode=WAL`` (readers never block the writer),
  ``synchronous=FULL`` (a commit survives a power cut: the audit log and the suppression list
  must not lose acknowledged writes), ``busy_timeout=10000`` (a writer waits for another
  process's write lock instead of failing at once) and ``foreign_keys=ON``.
* **PostgreSQL** (``postgresql+asyncpg://user@host:port/db``): the scale-out. A connect timeout
  keeps an unreachable server from hanging a send; an optional ``schema`` sets ``search_path``.

Every SQLAlchemy, driver and OS error is turned into :class:`~prospect_mailer.errors.StoreError`
here, with ``raise ... from exc``, by :func:`translate_errors`. Statement parameters are hidden
from error messages (``hide_parameters``): they may hold prospect data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from ..errors import ConfigError, StoreError

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "SQLITE_PRAGMAS",
    "WRITE_LOCK_WAIT",
    "Database",
    "create_engine",
    "parse_url",
    "sqlite_url",
    "translate_errors",
]

log = logging.getLogger("prospect_mailer.store")

#: PRAGMAs run on every new SQLite connection, in this order.
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Seconds a write transaction waits for the SQLite write lock (as the busy timeout did).
WRITE_LOCK_WAIT = SQLITE_BUSY_TIMEOUT_MS / 1000
SQLITE_PRAGMAS: tuple[tuple[str, str], ...] = (
    ("busy_timeout", str(SQLITE_BUSY_TIMEOUT_MS)),
    ("journal_mode", "WAL"),
    ("synchronous", "FULL"),
    ("foreign_keys", "ON"),
)
_WAL_SWITCH_ATTEMPTS = 100  # x 0.05 s; see _SQLiteConnector

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_STORE_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    OSError,  # includes TimeoutError and ConnectionRefusedError from the drivers
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """Return the ``sqlite+aiosqlite`` URL of the database file at ``path`` (made absolute)."""
    return f"sqlite+aiosqlite:///{Path(path).expanduser().absolute()}"


def parse_url(url: str | os.PathLike[str]) -> URL:
    """Parse a store URL, mapping sync driver names to their async counterparts.

    Accepted: ``sqlite+aiosqlite:///file.db`` (also ``sqlite:///file.db``), a bare file path,
    ``postgresql+asyncpg://...`` (also ``postgresql://`` and ``postgres://``).

    Raises:
        ConfigError: the URL cannot be parsed or names an unsupported database or driver.
    """
    text = os.fspath(url)
    if "://" not in text:
        if not text.strip():
            raise ConfigError("store URL is empty")
        text = sqlite_url(text)
    try:
        parsed = make_url(text)
    except ArgumentError as exc:
        raise ConfigError(f"cannot parse store URL: {exc}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "aiosqlite"):
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres") and driver in ("", "asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(
        f"unsupported store URL scheme {parsed.drivername!r}: "
        "use sqlite+aiosqlite:///path/file.db or postgresql+asyncpg://user@host/db"
    )


def create_engine(
    url: URL,
    *,
    schema: str | None = None,
    connect_timeout: float = 5.0,
    pool_size: int = 10,
    pool_pre_ping: bool = True,
    echo: bool = False,
) -> AsyncEngine:
    """Create the async engine for ``url`` (already checked by :func:`parse_url`).

    Raises:
        ConfigError: ``schema`` is not a plain identifier, or is given for SQLite.
        StoreError: the SQLite file's directory does not exist, or the path is a directory.
    """
    options: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if url.get_backend_name() == "sqlite":
        if schema is not None:
            raise ConfigError("a schema can only be chosen on PostgreSQL")
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            # One in-memory database shared by every task: a single connection.
            options["poolclass"] = StaticPool
            engine = create_async_engine(url, **options)
            event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
            return engine
        if not url.query.get("uri"):
            _check_sqlite_path(database)
        connector = _SQLiteConnector(url)
        engine = create_async_engine(url, async_creator=connector, **options)
        connector.dialect = engine.dialect
        return engine
    connect_args: dict[str, Any] = {"timeout": connect_timeout}
    if schema is not None:
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(f"invalid schema name {schema!r}: letters, digits and _ only")
        connect_args["server_settings"] = {"search_path": schema}
    options.update(
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=max(connect_timeout, 1.0) * 6,
        pool_pre_ping=pool_pre_ping,
        pool_recycle=1800,
    )
    return create_async_engine(url, **options)


def _check_sqlite_path(database: str) -> None:
    # Refused here rather than by the driver: a failed aiosqlite connect leaves a thread
    # behind that may report to an event loop that is already closed.
    path = Path(database)
    if path.is_dir():
        raise StoreError(f"opening the store failed: {database} is a directory")
    if not path.parent.is_dir():
        raise StoreError(f"opening the store failed: no directory {path.parent}")


class _SQLiteConnector:
    """Opens an aiosqlite connection and applies :data:`SQLITE_PRAGMAS`, or cleans up.

    Used as the engine's ``async_creator`` so that a connection whose set-up fails (a file
    that is not a database, a read-only file) is closed and its thread stopped, instead of
    being left to the garbage collector.
    """

    def __init__(self, url: URL) -> None:
        self.url = url
        self.dialect: Any = None

    async def __call__(self) -> aiosqlite.Connection:
        args, kwargs = self.dialect.create_connect_args(self.url)
        connection = aiosqlite.connect(*args, **kwargs)
        thread = getattr(connection, "_thread", None)
        if thread is not None:
            thread.daemon = True  # as SQLAlchemy does: never block interpreter exit
        try:
            await connection
        except BaseException:
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join, 5)
            raise
        try:
            for name, value in SQLITE_PRAGMAS:
                if name == "journal_mode":
                    await _switch_to_wal(connection)
                else:
                    cursor = await connection.execute(f"PRAGMA {name}={value}")
                    await cursor.close()
        except BaseException:
            await connection.close()
            raise
        return connection


async def _switch_to_wal(connection: aiosqlite.Connection) -> None:
    # WAL is persistent: only the first connection to a new file switches. Two connections
    # switching at once can deadlock on the lock upgrade, which SQLite reports at once as
    # "database is locked" without calling the busy handler; the loser simply retries.
    for attempt in range(_WAL_SWITCH_ATTEMPTS):
        try:
            cursor = await connection.execute("PRAGMA journal_mode=WAL")
            await cursor.close()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_SWITCH_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for name, value in SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {name}={value}")
    finally:
        cursor.close()


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn database, driver and OS errors raised inside the block into :class:`StoreError`.

    The message starts with ``what`` (e.g. ``"suppression lookup"``) and never contains the
    statement's parameters.
    """
    try:
        yield
    except StoreError:
        raise
    except _STORE_ERRORS as exc:
        raise StoreError(f"{what} failed: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """A one-line description of a foreign error, without SQL parameters."""
    inner: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        inner = exc.orig
    text = str(inner).strip().splitlines()
    first = text[0] if text else ""
    detail = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    return detail[:300]


async def _take_sqlite_write_lock(conn: AsyncConnection, wait: float, waiting: str) -> None:
    """``BEGIN IMMEDIATE``, retried every few ms for up to ``wait`` seconds (see
    :meth:`Database.transaction`); the connection's busy timeout is restored after."""
    await conn.exec_driver_sql("PRAGMA busy_timeout=20")
    try:
        deadline = time.monotonic() + wait
        warned = not waiting
        while True:
            try:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                if not warned:
                    log.warning(
                        "waiting for the store's write lock: %s (up to %.0f s)", waiting, wait
                    )
                    warned = True
            await asyncio.sleep(0.005)
    finally:
        await conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


class Database:
    """The engine plus what every part of the store needs: dialect, open/closed, transactions.

    Internal: shared by the suppression list, the audit log, the claims and the prospects.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self.closed = False
        # An in-memory SQLite database is one connection shared by every task: a task's
        # transaction (or a read's rollback on exit) would otherwise end another's halfway,
        # losing writes already reported as done. There, one task at a time.
        self._one_at_a_time = (
            asyncio.Lock() if isinstance(engine.sync_engine.pool, StaticPool) else None
        )

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if self._one_at_a_time is None:
            yield
            return
        async with self._one_at_a_time:
            yield

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise StoreError(f"{what} failed: the store is closed")

    @asynccontextmanager
    async def transaction(
        self, what: str, *, lock_wait: float = WRITE_LOCK_WAIT, waiting: str = ""
    ) -> AsyncIterator[AsyncConnection]:
        """A connection in a write transaction, committed on success, errors translated.

        On SQLite the transaction starts by taking the database write lock (``BEGIN
        IMMEDIATE``), retried every few milliseconds for up to ``lock_wait`` seconds: SQLite's
        own busy handler sleeps up to 100 ms between attempts, and under a relay's hundreds of
        commits a second an unsubscribe took up to 0.4 s to get its turn (measured). Taking it
        first also means a read made in the transaction cannot be overtaken before the write.
        ``waiting``: logged as a warning if the lock is not had at once (why it may be long).
        """
        self._check_open(what)
        with translate_errors(what):
            async with self._turn(), self.engine.begin() as conn:
                if self.dialect == "sqlite":
                    await _take_sqlite_write_lock(conn, lock_wait, waiting)
                yield conn

    @asynccontextmanager
    async def connection(self, what: str) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (rolled back on exit), errors translated."""
        self._check_open(what)
        with translate_errors(what):
            async with self._turn(), self.engine.connect() as conn:
                yield conn

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """The dialect's ``INSERT`` (with ``ON CONFLICT`` support) for ``table``."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    async def dispose(self) -> None:
        """Close every pooled connection; later calls fail with :class:`StoreError`."""
        self.closed = True
        with translate_errors("closing the store"):
            await self.engine.dispose()
