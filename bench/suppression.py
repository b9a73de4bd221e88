"""Suppression checks against a large list: a batch of 1,000 and single RCPT-time lookups.

    python -m bench.suppression [--entries 10000000] [--batches 50] [--singles 2000]

Targets (issue 6): a batch of 1,000 recipients against 10,000,000 entries in < 5 ms; a single
check p50 < 100 µs. Baselines in the same run, through the sqlite3 module directly: the same
indexed query on one connection (what a script gets), and the reader's own strategy (the
batch in two parts on two connections and threads, each one JSON-aggregate query), whose
distance to ours is the cost of our layer. The three take turns batch by batch (and the two
single checks key by key), so a change of the VM's state during the run (steal, the page
cache) reaches all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import random
import sqlite3
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prospect_mailer.store import Store, sqlite_url

from .common import ROOT, read_through
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


class Raw:
    """The baselines, through the sqlite3 module directly."""

    def __init__(self, path: Path) -> None:
        self.con = sqlite3.connect(path)
        self.cons = [sqlite3.connect(path, check_same_thread=False) for _ in range(2)]
        self.pool = ThreadPoolExecutor(2)

    def batch(self, b: list[str]) -> None:
        """The same indexed query on one connection (what a script gets)."""
        marks = ",".join("?" * len(b))
        q = f"SELECT {COLS} FROM suppression WHERE key_hash IN ({marks})"
        self.con.execute(q, b).fetchall()

    def single(self, k: str) -> None:
        self.con.execute(f"SELECT {COLS} FROM suppression WHERE key_hash = ?", (k,)).fetchall()

    def parallel(self, b: list[str]) -> None:
        """The reader's strategy: two threads, each one ``json_group_array`` query over half
        the sorted batch."""

        def part(con: sqlite3.Connection, keys: list[str]) -> list[Any]:
            marks = ",".join("?" * len(keys))
            q = (
                f"SELECT json_group_array(json_array({COLS})) FROM suppression "
                f"WHERE key_hash IN ({marks})"
            )
            ((text,),) = con.execute(q, keys).fetchall()
            return list(json.loads(text))

        ordered = sorted(b)
        half = len(ordered) // 2
        first = self.pool.submit(part, self.cons[0], ordered[:half])
        second = self.pool.submit(part, self.cons[1], ordered[half:])
        first.result()
        second.result()

    def close(self) -> None:
        self.pool.shutdown()
        for con in (self.con, *self.cons):
            con.close()


async def measure(path: Path, entries: int, batches: int, singles: int) -> dict[str, list[float]]:
    """Each way in turn, batch after batch (the order rotating), each with keys of its own:
    all three see the same state of the caches, whatever the VM does meanwhile."""
    rng = random.Random(42)
    raw = Raw(path)
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    async with Store.connect(sqlite_url(path)) as store:
        lookup = store.suppression.lookup
        await lookup(keys(1000, entries, rng))  # warm up the connections
        raw.batch(keys(1000, entries, rng))
        raw.parallel(keys(1000, entries, rng))

        async def ours(b: list[str]) -> None:
            hits = await lookup(b)
            assert len(hits) >= len(b) // 2 - 1

        async def ours_single(k: str) -> None:
            await lookup([k])

        async def timed(name: str, way: Callable[[Any], object], arg: object) -> None:
            t = time.perf_counter()
            result = way(arg)
            if inspect.isawaitable(result):
                await result
            times[name].append(time.perf_counter() - t)

        batch_ways = list(zip(NAMES[:3], (raw.batch, raw.parallel, ours), strict=True))
        for i in range(batches):
            for name, way in batch_ways[i % 3 :] + batch_ways[: i % 3]:
                await timed(name, way, keys(1000, entries, rng))
        single_ways = list(zip(NAMES[3:], (raw.single, ours_single), strict=True))
        for i in range(singles):
            for name, way in single_ways if i % 2 else single_ways[::-1]:
                # keys() alternates absent and present: both ways get both, in turn.
                await timed(name, way, keys(2, entries, rng)[(i // 2) % 2])
    raw.close()
    return times


NAMES = (
    "batch of 1,000: raw sqlite3",
    "batch of 1,000: raw sqlite3, 2 threads, JSON",
    "batch of 1,000: store.suppression.lookup",
    "single check: raw sqlite3",
    "single check: store.suppression.lookup",
)
TARGETS = {NAMES[2]: 5e-3, NAMES[4]: 100e-6}


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
    read_through(path)
    times = asyncio.run(measure(path, a.entries, a.batches, a.singles))
    rows = [(name, times[name], TARGETS.get(name)) for name in NAMES]
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
