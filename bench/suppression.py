"""Suppression checks against a large list: a batch of 1,000 and single RCPT-time lookups.

    python -m bench.suppression [--entries 10000000] [--batches 50] [--singles 2000]

Targets (issue 6): a batch of 1,000 recipients against 10,000,000 entries in < 5 ms; a single
check p50 < 100 µs. Baselines in the same run, through the sqlite3 module directly: the same
indexed query on one connection (what a script gets), and the reader's own strategy (the
batch in two parts on two connections and threads, each one JSON-aggregate query), whose
distance to ours is the cost of our layer.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prospect_mailer.store import Store, sqlite_url

from .common import ROOT
from .suppression_db import cached_store

COLS = "kind, key_hash, scope, scope_value, reason, source, created_at"  # what the store reads


def keys(n: int, entries: int, rng: random.Random) -> list[str]:
    """Half present in the list, half absent."""
    out = []
    for j in range(n):
        if j % 2:
            i = rng.randrange(entries)
            out.append(hashlib.sha256(f"suppressed{i}@list.example".encode()).hexdigest())
        else:
            out.append(hashlib.sha256(f"absent{rng.random()}@x.example".encode()).hexdigest())
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def ours(
    path: Path, batches: list[list[str]], singles: list[str]
) -> tuple[list[float], list[float]]:
    async with Store.connect(sqlite_url(path)) as store:
        await store.suppression.lookup(batches[0])  # warm up the connection
        batch_times = []
        for b in batches:
            t = time.perf_counter()
            hits = await store.suppression.lookup(b)
            batch_times.append(time.perf_counter() - t)
            assert len(hits) >= len(b) // 2 - 1
        single_times = []
        for k in singles:
            t = time.perf_counter()
            await store.suppression.lookup([k])
            single_times.append(time.perf_counter() - t)
    return batch_times, single_times


def raw(
    path: Path, batches: list[list[str]], singles: list[str]
) -> tuple[list[float], list[float]]:
    con = sqlite3.connect(path)
    batch_times = []
    for b in batches:
        t = time.perf_counter()
        marks = ",".join("?" * len(b))
        q = f"SELECT {COLS} FROM suppression WHERE key_hash IN ({marks})"
        con.execute(q, b).fetchall()
        batch_times.append(time.perf_counter() - t)
    single_times = []
    for k in singles:
        t = time.perf_counter()
        con.execute(f"SELECT {COLS} FROM suppression WHERE key_hash = ?", (k,)).fetchall()
        single_times.append(time.perf_counter() - t)
    con.close()
    return batch_times, single_times


def raw_parallel(path: Path, batches: list[list[str]]) -> list[float]:
    """Two threads, each one ``json_group_array`` query over half the sorted batch."""
    cons = [sqlite3.connect(path, check_same_thread=False) for _ in range(2)]

    def part(con: sqlite3.Connection, b: list[str]) -> list[Any]:
        marks = ",".join("?" * len(b))
        q = (
            f"SELECT json_group_array(json_array({COLS})) FROM suppression "
            f"WHERE key_hash IN ({marks})"
        )
        ((text,),) = con.execute(q, b).fetchall()
        return list(json.loads(text))

    times = []
    with ThreadPoolExecutor(2) as pool:
        for b in batches:
            t = time.perf_counter()
            ordered = sorted(b)
            half = len(ordered) // 2
            first = pool.submit(part, cons[0], ordered[:half])
            second = pool.submit(part, cons[1], ordered[half:])
            first.result()
            second.result()
            times.append(time.perf_counter() - t)
    for con in cons:
        con.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--entries", type=int, default=10_000_000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--singles", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "suppression.json")
    a = ap.parse_args()
    path = cached_store(a.entries)
    # Both measured warm: the file read once through the OS cache first (as a running relay
    # has it), and each side gets keys of its own, so neither rides on pages the other loaded.
    with path.open("rb") as f:
        while f.read(16 * 1024 * 1024):
            pass
    rng = random.Random(42)
    rb, rs = raw(path, [keys(1000, a.entries, rng) for _ in range(a.batches)],
                 keys(a.singles, a.entries, rng))  # fmt: skip
    rp = raw_parallel(path, [keys(1000, a.entries, rng) for _ in range(a.batches)])
    ob, os_ = asyncio.run(
        ours(path, [keys(1000, a.entries, rng) for _ in range(a.batches)],
             keys(a.singles, a.entries, rng))
    )  # fmt: skip
    rows = [
        ("batch of 1,000: raw sqlite3", rb, None),
        ("batch of 1,000: raw sqlite3, 2 threads, JSON", rp, None),
        ("batch of 1,000: store.suppression.lookup", ob, 5e-3),
        ("single check: raw sqlite3", rs, None),
        ("single check: store.suppression.lookup", os_, 100e-6),
    ]
    print(f"\nSuppression checks against {a.entries:,} entries (SQLite WAL, one file)")
    print(f"{'measure':44} {'p50':>10} {'p95':>10} {'target':>10}  verdict")
    out = []
    for name, times, target in rows:
        p50, p95 = pct(times, 0.5), pct(times, 0.95)
        verdict = "" if target is None else ("ok" if p50 < target else "MISSED")
        print(
            f"{name:44} {p50 * 1e6:8.0f}µs {p95 * 1e6:8.0f}µs "
            f"{'' if target is None else f'{target * 1e6:8.0f}µs':>10}  {verdict}"
        )
        out.append(
            {
                "measure": name,
                "p50_us": p50 * 1e6,
                "p95_us": p95 * 1e6,
                "mean_us": statistics.mean(times) * 1e6,
                "target_us": None if target is None else target * 1e6,
            }
        )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"entries": a.entries, "results": out}, indent=2), "utf-8")


if __name__ == "__main__":
    main()
