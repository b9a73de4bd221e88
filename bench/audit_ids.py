"""Audit appends on a large audit log: time-ordered ids (ours) against random ids (UUIDv4).

    python -m bench.audit_ids [--prefill 2000000] [--records 20000] [--writers 50]

The audit log only grows, and ``event_id`` and ``send_id`` are indexed. With random ids each
new record lands on a random leaf page of both indexes: once they outgrow SQLite's page
cache, every append first reads two pages back and writes two more to the WAL. Ours
(:func:`prospect_mailer.ids.new_id`, UUIDv7) start with the time, so appends stay on the
rightmost pages. Both configurations start from a copy of the same file of ``--prefill``
records (built once, cached under bench/.cache) and append through the same group-commit
writer with a random ``recipient_hash`` per record, as real sends have; the baseline, in the
same run, differs only by drawing ``event_id`` and ``send_id`` from ``uuid.uuid4()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from prospect_mailer.ids import new_id
from prospect_mailer.store import GENESIS_HASH, Store, audit_records, sqlite_url
from prospect_mailer.store.tables import AUDIT_EVENTS

from .audit import event
from .common import CACHE, ROOT, read_through
from .suppression_db import build_cached

_COLUMNS = tuple(c.name for c in AUDIT_EVENTS.c)  # the order of the rows below
_DETAILS = json.dumps({"smtp_code": 250, "smtp_reply": "2.0.0 Ok: queued", "n": "x" * 200})


def prefilled(records: int) -> Path:
    """A cached store whose audit log holds ``records`` records with random (UUIDv4) ids, as
    a log written before this change has. Indexes are built after the rows, for speed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"audit-{records}.db"
    if path.exists():
        return path

    def fill(con: sqlite3.Connection) -> None:
        indexes = con.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='audit_events'"
            " AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            con.execute(f'DROP INDEX "{name}"')
        insert = (
            f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_COLUMNS))})"
        )
        h = GENESIS_HASH
        for start in range(0, records, 50_000):
            rows = []
            for seq in range(start + 1, min(records, start + 50_000) + 1):
                h = os.urandom(32).hex()
                rows.append(
                    (seq, uuid.uuid4().hex, uuid.uuid4().hex,
                     f"2026-01-01T00:00:00.{seq:06d}+00:00", "send", "sent", "bench", 1, "acme",
                     "prospecting", os.urandom(32).hex(), "p***@x.example",
                     f"<{seq}@acme.example>", "library", "", _DETAILS, h, h)
                )  # fmt: skip
            con.executemany(insert, rows)
        for _, sql in indexes:
            con.execute(sql)
        con.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (records, h))

    return build_cached(path, f"{records} audit records", fill)


async def append(path: Path, n: int, writers: int, make_id: Callable[[], str]) -> float:
    # The store draws event_id itself: the baseline swaps its id function for uuid4's.
    saved = audit_records.new_id
    audit_records.new_id = make_id
    try:
        async with Store.connect(sqlite_url(path)) as store, store.audit.writer() as writer:
            counter = iter(range(n))

            async def one() -> None:
                for i in counter:
                    await writer.write(event(i, make_id()))

            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(writers)))
            return time.perf_counter() - t
    finally:
        audit_records.new_id = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prefill", type=int, default=2_000_000)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--writers", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two this many times")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "audit_ids.json")
    a = ap.parse_args()
    source = prefilled(a.prefill)
    kinds: dict[str, Callable[[], str]] = {
        "random ids (uuid4), baseline": lambda: uuid.uuid4().hex,
        "time-ordered ids (ours, UUIDv7)": new_id,
    }
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for _ in range(a.rounds):
            for name, make_id in kinds.items():
                copy = Path(tmp) / "audit.db"
                shutil.copyfile(source, copy)
                read_through(copy)  # warm the OS cache, as a running service has it
                rates[name].append(
                    a.records / asyncio.run(append(copy, a.records, a.writers, make_id))
                )
                for p in Path(tmp).iterdir():
                    p.unlink()
    base = max(rates["random ids (uuid4), baseline"])
    print(f"\nAudit appends onto a log of {a.prefill:,} records (SQLite WAL, synchronous=FULL)")
    print(f"{'ids':36} {'records/s (best of ' + str(a.rounds) + ')':>26}  ratio")
    out = []
    for name, values in rates.items():
        best = max(values)
        print(f"{name:36} {best:26.0f}  {best / base:.2f}x")
        out.append({"ids": name, "records_per_s": values, "best": best, "ratio": best / base})
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"prefill": a.prefill, "results": out}, indent=2), "utf-8")


if __name__ == "__main__":
    main()
