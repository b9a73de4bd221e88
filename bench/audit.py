"""Audit log throughput: records per second with grouped commits, durable before return.

    python -m bench.audit [--records 20000] [--writers 50] [--database URL]

Each of ``--writers`` coroutines appends records one at a time through the group-commit
writer and only continues once its record is committed (what the pipeline needs before it
reports a send). Baseline in the same run: one transaction per record. Target (issue 6):
>= 5,000 records/s sustained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from prospect_mailer.ids import new_id
from prospect_mailer.store import AuditEvent, Store, sqlite_url

from .common import ROOT


def event(i: int, send_id: str | None = None) -> AuditEvent:
    """Record ``i`` of a send, as real sends have them: a send id drawn as the pipeline draws
    it (unless given), and a recipient hash as random as SHA-256 makes it."""
    return AuditEvent(
        kind="send",
        status="sent",
        send_id=send_id or new_id(),
        campaign_id="bench",
        step=1,
        advertiser_id="acme",
        purpose="prospecting",
        recipient_hash=os.urandom(32).hex(),
        recipient_masked="p***@x.example",
        message_id=f"<{i:032x}@acme.example>",
        transport="library",
        details={"smtp_code": 250, "smtp_reply": "2.0.0 Ok: queued", "legal_basis": "consent"},
    )


async def grouped(url: str, n: int, writers: int) -> float:
    async with Store.connect(url) as store, store.audit.writer() as writer:
        counter = iter(range(n))

        async def one() -> None:
            for i in counter:
                await writer.write(event(i))

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(writers)))
        elapsed = time.perf_counter() - t
        assert (await store.audit.verify()).ok
        return elapsed


async def one_by_one(url: str, n: int) -> float:
    async with Store.connect(url) as store:
        t = time.perf_counter()
        for i in range(n):
            await store.audit.append([event(i)])
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--writers", type=int, default=50)
    ap.add_argument("--database", help="a database URL (default: a fresh SQLite file)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "audit.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_n = max(200, a.records // 20)
        url1 = a.database or sqlite_url(Path(tmp) / "one.db")
        t1 = asyncio.run(one_by_one(url1, base_n))
        rows.append(("one transaction per record (baseline)", base_n, t1, None))
        url2 = a.database or sqlite_url(Path(tmp) / "grouped.db")
        t2 = asyncio.run(grouped(url2, a.records, a.writers))
        rows.append((f"group commit, {a.writers} concurrent writers", a.records, t2, 5000.0))
    where = a.database or "SQLite WAL, synchronous=FULL"
    print(f"\nAudit log throughput ({where})")
    print(f"{'configuration':48} {'records':>8} {'records/s':>10} {'target':>8}  ratio")
    base_rate = rows[0][1] / rows[0][2]
    out = []
    for name, n, t, target in rows:
        rate = n / t
        verdict = "" if target is None else ("ok" if rate >= target else "MISSED")
        print(
            f"{name:48} {n:8d} {rate:10.0f} {'' if target is None else f'{target:8.0f}':>8}  "
            f"{rate / base_rate:.1f}x {verdict}"
        )
        out.append({"configuration": name, "records": n, "seconds": t, "records_per_s": rate})
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"results": out}, indent=2), "utf-8")


if __name__ == "__main__":
    main()
