"""Library ``send_many`` with everything on vs raw aiosmtplib, same sink, same concurrency.

    python -m bench.library [--messages 2000] [--concurrency 10] [--sizes 2k,100k]
                            [--suppression 1000000]

Ours: 1,000,000 suppression entries, both footers in both parts, audit records, claims,
SQLite WAL. Baseline: aiosmtplib sending freshly built EmailMessages over the same number of
connections. Target (issue 6): ours >= 0.8x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiosmtplib

from prospect_mailer import Campaign, Prospect, ProspectMailer, SMTPTransport
from prospect_mailer.store import Store, sqlite_url
from prospect_mailer.tokens import TokenSigner

from .common import (
    ROOT,
    Result,
    body_texts,
    emit,
    make_message,
    measure_end,
    measure_start,
    print_table,
    run_child,
    smtp_sink,
)
from .fixtures import bench_campaign, bench_prospect
from .suppression_db import cached_store, copy_store


async def raw(port: int, n: int, conc: int, size: str) -> Result:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        while not queue.empty():
            i = queue.get_nowait()
            msg = make_message(i, size)
            await client.send_message(msg, sender="ventes@acme.example", recipients=[msg["To"]])
        await client.quit()

    start = measure_start()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return measure_end(f"raw aiosmtplib {size}", n, start)


def campaign(size: str) -> Campaign:
    text, html = body_texts(size)
    return bench_campaign(f"bench-{size}", text, html)


def prospects(n: int) -> list[Prospect]:
    return [bench_prospect(f"p{i}@x.example") for i in range(n)]


async def ours(port: int, n: int, conc: int, size: str, entries: int) -> Result:
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        db = copy_store(entries, Path(tmp) / "store.db")
        people = prospects(n)
        transport = SMTPTransport("127.0.0.1", port, start_tls=False, pool_size=conc)
        async with Store.connect(sqlite_url(db)) as store:
            mailer = ProspectMailer(
                store=store,
                transport=transport,
                signer=TokenSigner(["bench-key-0123456789abcdef"]),
                base_url="https://optout.acme.example",
                mailto_domain="optout.acme.example",
                concurrency=conc,
            )
            start = measure_start()
            summary = await mailer.send_many(people, campaign(size), concurrency=conc)
            result = measure_end(
                f"prospect-mailer send_many {size}", n, start, counts=dict(summary.counts)
            )
            await mailer.close()
            await transport.close()
            if summary.counts["sent"] != n:
                raise RuntimeError(f"not all sent: {summary.counts}")
    result.baseline = f"raw aiosmtplib {size}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--sizes", default="2k,100k")
    ap.add_argument("--suppression", type=int, default=1_000_000)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "library.json")
    a = ap.parse_args()
    if a.one:
        kind, size = a.one.split(":")
        if kind == "raw":
            emit(asyncio.run(raw(a.port, a.messages, a.concurrency, size)))
        else:
            emit(asyncio.run(ours(a.port, a.messages, a.concurrency, size, a.suppression)))
        return
    if "5m" in a.sizes.split(","):
        # Campaign templates carry no attachment: the 5 MB message with one is a relay case.
        sys.exit("the library sends templated text+HTML: use --sizes 2k,100k (5m: bench.relay)")
    cached_store(a.suppression)
    results = []
    with smtp_sink() as (port, kind):
        for size in a.sizes.split(","):
            n = a.messages
            common = ["--port", str(port), "--messages", str(n), "--concurrency",
                      str(a.concurrency), "--suppression", str(a.suppression)]  # fmt: skip
            results.append(run_child("bench.library", f"raw:{size}", common))
            results.append(run_child("bench.library", f"ours:{size}", common))
    print_table(
        f"Library send_many vs raw aiosmtplib (sink: {kind}, concurrency {a.concurrency}, "
        f"{a.suppression:,} suppression entries)",
        results,
        a.json,
    )


if __name__ == "__main__":
    main()
