"""Peak memory of the streaming paths, and the relay's responsiveness during a big message.

    python -m bench.memory [--prospects 1000000] [--sends 100000] [--big-mb 20]

1. ``prospect-mailer send --dry-run`` over a CSV of ``--prospects`` rows (default 1,000,000):
   peak RSS of the whole CLI process. Target (issue 6): < 200 MB.
2. ``send_many`` sending ``--sends`` messages for real to smtp-sink (audit, claims, footers):
   peak RSS. Target: < 200 MB (the same code path at 1,000,000 only takes longer).
3. While one client sends a ``--big-mb`` MB message through the relay, a second client's
   NOOP round trips are timed. Target: the relay keeps answering within 100 ms.
Baseline in the same run: the interpreter with the package imported and nothing done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .common import ROOT, free_port, smtp_sink, wait_port

HEADER = (
    "email,name,recipient_type,legal_basis,source_type,source_name,job_function,"
    "optout_offered_at_collection,collected_at\n"
)
CAMPAIGN = """\
id = "bench-memory"
purpose = "prospecting"
subject = "Capteurs"
from = "ACME Ventes <ventes@acme.example>"
category = "sensors"
target_functions = ["CTO"]
locale = "fr"
text_template = "body.txt.j2"

[advertiser]
id = "acme"
legal_name = "ACME SAS"
postal_address = "1 rue de la Paix, 75002 Paris"
contact = "dpo@acme.example"
"""


def write_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    (folder / "body.txt.j2").write_text("Bonjour {{ prospect.name }},\nNos capteurs.\n", "utf-8")
    campaign = folder / "campaign.toml"
    campaign.write_text(CAMPAIGN, "utf-8")
    csv = folder / "prospects.csv"
    with csv.open("w", encoding="utf-8") as fh:
        fh.write(HEADER)
        for i in range(rows):
            job = "CTO" if i % 10 else "Chef"
            fh.write(f"p{i}@x{i % 5000}.example,P {i},professional,legitimate_interest,public,"
                     f"Annuaire,{job},yes,2026-10-01\n")  # fmt: skip
    return campaign, csv


def baseline_rss() -> float:
    code = "import prospect_mailer.cli, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def dry_run(folder: Path, campaign: Path, csv: Path) -> tuple[float, float]:
    env = {**os.environ, "PROSPECT_MAILER_DATABASE_URL": f"sqlite+aiosqlite:///{folder / 'd.db'}",
           "PROSPECT_MAILER_SECRET_KEY_FILE": str(folder / "key"), "COLUMNS": "120"}  # fmt: skip
    exe = Path(sys.executable).parent / "prospect-mailer"
    t = time.perf_counter()
    proc = subprocess.Popen(
        [str(exe), "send", str(campaign), str(csv), "--dry-run", "--show", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise RuntimeError(f"dry run failed: {status}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def send_many_child(port: int, n: int, folder: str) -> None:
    from prospect_mailer import Prospect, ProspectMailer, SMTPTransport, load_campaign
    from prospect_mailer.store import Store, sqlite_url
    from prospect_mailer.tokens import TokenSigner

    from .fixtures import bench_prospect

    def people() -> Iterator[Prospect]:
        for i in range(n):
            yield bench_prospect(f"p{i}@x{i % 5000}.example")

    async def run() -> None:
        campaign = load_campaign(Path(folder) / "campaign.toml")
        transport = SMTPTransport("127.0.0.1", port, start_tls=False, pool_size=10)
        async with Store.connect(sqlite_url(Path(folder) / "s.db")) as store:
            mailer = ProspectMailer(store=store, transport=transport,
                                    signer=TokenSigner(["bench-key-0123456789abcdef"]),
                                    base_url="https://optout.acme.example")  # fmt: skip
            summary = await mailer.send_many(people(), campaign)
            await mailer.close()
        await transport.close()
        assert summary.counts["sent"] == n, summary.counts

    asyncio.run(run())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


#: ``python -c _BIG_CLIENT PORT MB``: sends one message of about MB megabytes to the relay.
_BIG_CLIENT = """
import smtplib, sys
port, mb = int(sys.argv[1]), int(sys.argv[2])
body = ("x" * 998 + "\\r\\n") * (mb * 1024 * 1024 // 1000)
msg = ("From: ventes@acme.example\\r\\nTo: 1to@x.example\\r\\nSubject: big\\r\\n"
       "Message-ID: <big@acme.example>\\r\\n\\r\\n" + body).encode()
with smtplib.SMTP("127.0.0.1", port, timeout=300) as c:
    c.sendmail("ventes@acme.example", ["1to@x.example"], msg)
"""


def relay_stall(big_mb: int, folder: Path) -> float:
    """Max NOOP round trip (ms) of a second client while a big message goes through."""
    with smtp_sink() as (sink, _):
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.relay_server", str(folder / "r.db"), str(port),
             str(sink), "10"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            server.stdout.readline()
            wait_port(port, 60)
            # The big message goes from another process: smtplib quotes and sends it holding
            # the GIL for tens of ms at a time, which in this process also delays the probe's
            # own round trips: the figure is then partly the client's, not the relay's.
            big = subprocess.Popen(
                [sys.executable, "-c", _BIG_CLIENT, str(port), str(big_mb)],
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            worst = 0.0
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as probe:
                    while big.poll() is None:
                        t = time.perf_counter()
                        probe.noop()
                        worst = max(worst, (time.perf_counter() - t) * 1000)
                        time.sleep(0.01)
            finally:
                if big.poll() is None:  # the probe failed: the client is not left behind
                    big.kill()
                    big.wait()
            failure = big.stderr.read() if big.stderr else ""
            if big.returncode != 0:
                raise RuntimeError(f"the big message was refused: {failure.strip()}")
            return worst
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prospects", type=int, default=1_000_000)
    ap.add_argument("--sends", type=int, default=100_000)
    ap.add_argument("--big-mb", type=int, default=20)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    a = ap.parse_args()
    if a.child:
        send_many_child(int(a.child[0]), int(a.child[1]), a.child[2])
        return
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        folder = Path(tmp)
        base = baseline_rss()
        rows.append(("baseline: interpreter + package imported", "", base, None))
        campaign, csv = write_inputs(folder, a.prospects)
        seconds, rss = dry_run(folder, campaign, csv)
        rows.append((f"send --dry-run, {a.prospects:,} CSV rows", f"{seconds:.0f} s", rss, 200.0))
        with smtp_sink() as (port, _):
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "bench.memory", "--child", str(port), str(a.sends), tmp],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            rss = float(out.stdout.strip().splitlines()[-1])
            took = f"{time.perf_counter() - t:.0f} s"
            rows.append((f"send_many, {a.sends:,} messages sent", took, rss, 200.0))
        stall = relay_stall(a.big_mb, folder)
    print("\nMemory and responsiveness")
    print(f"{'measure':48} {'time':>8} {'peak RSS MB':>12} {'target':>8}  verdict")
    out_rows = []
    for name, when, value, target in rows:
        verdict = "" if target is None else ("ok" if value < target else "MISSED")
        shown = "" if target is None else f"{target:8.0f}"
        print(f"{name:48} {when:>8} {value:12.0f} {shown:>8}  {verdict}")
        out_rows.append({"measure": name, "time": when, "peak_rss_mb": value, "target_mb": target})
    verdict = "ok" if stall < 100 else "MISSED"
    print(f"{f'relay: 2nd client NOOP during a {a.big_mb} MB message':48} {'':>8} "
          f"{stall:9.0f} ms {'100 ms':>8}  {verdict}")  # fmt: skip
    out_rows.append({"measure": "relay NOOP worst ms during big message", "ms": stall})
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"results": out_rows}, indent=2), "utf-8")


if __name__ == "__main__":
    main()
