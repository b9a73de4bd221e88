"""Build (once, cached under bench/.cache) a store file holding N suppression entries."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from prospect_mailer.store import Store, sqlite_url

from .common import CACHE


def schema(path: Path, key_filter: bool = False) -> None:
    """Create the store's schema in ``path``, or bring it to the current version (in a thread
    of its own: callers may be inside an event loop); ``key_filter``: also load the store's
    saved suppression key filter, or build and save one (once per database, as a user's
    store has it after its first large send)."""

    async def open_once() -> None:
        async with Store.connect(sqlite_url(path)) as store:
            if key_filter and not await store.suppression.prepare():
                raise SystemExit(f"{path}: the suppression key filter could not be built")

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, open_once()).result()


def cached_store(entries: int) -> Path:
    """Path of a cached SQLite store with ``entries`` address suppression entries."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"suppression-{entries}.db"
    if path.exists():
        # A cache built by an older schema is migrated once, and its key filter saved once.
        schema(path, key_filter=True)
        return path

    def fill(con: sqlite3.Connection) -> None:
        now = datetime.now(UTC).isoformat()
        batch = 100_000
        for start in range(0, entries, batch):
            rows = [
                (
                    "address",
                    hashlib.sha256(f"suppressed{i}@list.example".encode()).hexdigest(),
                    "advertiser",
                    "acme",
                    "unsubscribe",
                    "bench",
                    now,
                )
                for i in range(start, min(entries, start + batch))
            ]
            con.executemany(
                "INSERT INTO suppression (kind, key_hash, scope, scope_value, reason, source,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    build_cached(path, f"{entries} entries", fill)
    schema(path, key_filter=True)
    return path


def build_cached(path: Path, what: str, fill: Callable[[sqlite3.Connection], None]) -> Path:
    """Build the store file ``path`` once: the store's schema, then ``fill(connection)`` with
    journaling and syncing off (a half-built file is never at ``path``), then WAL mode."""
    tmp = path.with_suffix(".building")
    for p in tmp.parent.glob(tmp.name + "*"):
        p.unlink()
    schema(tmp)
    started = time.perf_counter()
    con = sqlite3.connect(tmp)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    fill(con)
    con.commit()
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    shutil.move(tmp, path)
    print(f"built {path.name}: {what} in {time.perf_counter() - started:.0f} s")
    return path


def copy_store(entries: int, dest: Path) -> Path:
    """A private copy of the cached store (benchmarks write to it)."""
    shutil.copyfile(cached_store(entries), dest)
    return dest
