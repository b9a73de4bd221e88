"""Relay throughput: ``smtp-source -> relay -> smtp-sink`` against a bare forwarding proxy.

    python -m bench.relay [--messages 2000] [--sessions 10] [--sizes 2k,100k,5m]

Both servers run in their own process; ``smtp-source`` and ``smtp-sink`` (Postfix's C tools,
Debian package ``postfix``; the daemon is never started) drive and absorb the load, and also
run straight into each other (the C ceiling on loopback; no server, so no CPU column). Each
configuration is run with reused client sessions (``smtp-source -d``) and with a new session
per message. Target (issue 6): the relay >= 0.6x the bare proxy. The relay runs on the event
loop ``prospect-mailer relay`` takes (uvloop when the ``fast`` extra is installed); the bare
proxy, the baseline, on asyncio's own loop as a home-made relay would, and also on uvloop (a row
for comparison, when installed).

On a shared VM msgs/s moves by up to 2x from one minute to the next, so each configuration is
run ``--rounds`` times (3 by default), the servers taking turns round by round (the order
rotating), and each row shows the round of median msgs/s (all rounds' figures in the JSON):
a ratio is then of two medians taken over the same minutes, not of two runs a minute apart.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prospect_mailer.relay_workers import event_loop_factory

from .common import ROOT, Result, body_texts, free_port, print_table, smtp_sink, wait_port

#: What `prospect-mailer relay` runs on here (relay.event_loop = auto: uvloop when installed).
RELAY_LOOP = event_loop_factory("auto")[0]


def message_file(directory: Path, size: str) -> Path:
    """2k and 100k: multipart/alternative text + HTML; 5m: that plus a 5 MB attachment."""
    text, html = body_texts(size)
    html = html.replace("</p>", "</p>\r\n")  # SMTP lines stay under 1,000 octets (RFC 5321)
    boundary = "=_bench_boundary"
    alternative = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        + text.replace("\n", "\r\n")
        + f"\r\n--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + html + f"\r\n--{boundary}--\r\n"
    )
    if size == "5m":
        outer = "=_bench_mixed"
        blob = base64.encodebytes(random.Random(5).randbytes(5 * 1024 * 1024 * 3 // 4))
        content = (
            f'Content-Type: multipart/mixed; boundary="{outer}"\r\n\r\n'
            f"--{outer}\r\n"
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
            + alternative
            + f"--{outer}\r\nContent-Type: application/pdf\r\n"
            'Content-Disposition: attachment; filename="catalogue.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
            + blob.decode("ascii").replace("\n", "\r\n")
            + f"--{outer}--\r\n"
        )
    else:
        content = (
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n' + alternative
        )
    body = (
        "From: ACME Ventes <ventes@acme.example>\r\n"
        "To: prospect@x.example\r\n"
        "Subject: =?utf-8?q?Capteurs_connect=C3=A9s?=\r\n"  # as CRMs write a French one
        "Message-ID: <bench-1@acme.example>\r\n"
        "MIME-Version: 1.0\r\n" + content
    )
    path = directory / f"message-{size}.eml"
    # smtp-source -F reads lines and sends each with CRLF: the file has plain LF ends.
    path.write_bytes(body.replace("\r\n", "\n").encode("utf-8"))
    return path


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (relay workers are children of the relay process)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for child in children for p in tree(int(child)))]


def own_cpu(pid: int) -> float:
    """CPU seconds used so far by the process ``pid`` alone (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants."""
    return sum(own_cpu(p) for p in tree(pid))


def proc_peak_rss_mb(pid: int) -> float:
    """Peak RSS of ``pid`` plus that of each descendant (an upper bound of the total)."""
    total = 0.0
    for p in tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def drive(port: int, msg: Path, n: int, sessions: int, reuse: bool) -> tuple[float, list[str]]:
    """``smtp-source`` sends ``n`` copies of ``msg`` to ``port``: (seconds, error lines)."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    args = [source, "-s", str(sessions), "-m", str(n), "-N", "-t", "to@x.example",
            "-f", "ventes@acme.example", "-F", str(msg), "-M", "bench.example"]  # fmt: skip
    if reuse:
        args.append("-d")
    t0 = time.perf_counter()
    out = subprocess.run([*args, f"127.0.0.1:{port}"], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    return wall, [line for line in out.stderr.splitlines() if line.strip()]


def ceiling(sink_port: int, msg: Path, n: int, sessions: int, reuse: bool) -> Result:
    """``smtp-source -> smtp-sink`` with nothing between: the C ceiling on loopback."""
    wall, errors = drive(sink_port, msg, n, sessions, reuse)
    name = f"C ceiling: smtp-source -> sink {msg.stem[8:]} " + (
        "reused sessions" if reuse else "new sessions"
    )
    return Result(name, n, wall, 0.0, 0.0, extra={"client_errors": errors[:5], "no_server": True})


@contextlib.contextmanager
def serving(
    kind: str, sink_port: int, prospects: int, workers: int = 1, checkout: Path = ROOT
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A server in its own process, listening, forwarding to ``sink_port``: the bare proxy
    (``kind`` "bare", or "bare-uvloop") or ours (``kind`` "ours", on a fresh store with
    ``prospects`` registered), run from ``checkout`` (its package first on the path: another
    checkout of this repository for ``bench.relay_ab``); yields the process and its port,
    terminates it after."""
    port = free_port()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        if kind.startswith("bare"):
            loop = "uvloop" if kind == "bare-uvloop" else "asyncio"
            cmd = [sys.executable, "-m", "bench.bare_proxy", str(port), str(sink_port), loop]
        else:
            db = str(Path(tmp) / "relay.db")
            # Named, not "auto" (the relay's default: process with one worker, else thread),
            # so that each row says which it measured.
            writer = "process" if kind == "ours-process" else "thread"
            cmd = [sys.executable, "-m", "bench.relay_server", db, str(port), str(sink_port),
                   str(prospects), str(workers), writer]  # fmt: skip
        server = subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.PIPE, text=True)
        try:
            if kind.startswith("ours"):
                assert server.stdout is not None
                server.stdout.readline()  # "ready" once the prospects are registered
            wait_port(port, 60)
            yield server, port
        finally:
            server.terminate()
            server.wait(30)


def run(
    kind: str, sink_port: int, msg: Path, n: int, sessions: int, reuse: bool, workers: int = 1
) -> Result:
    if kind == "direct":
        return ceiling(sink_port, msg, n, sessions, reuse)
    with serving(kind, sink_port, n + 10, workers) as (server, port):
        cpu0 = proc_cpu(server.pid)
        wall, errors = drive(port, msg, n, sessions, reuse)
        cpu = proc_cpu(server.pid) - cpu0
        rss = proc_peak_rss_mb(server.pid)
    who = {
        "bare": "bare proxy",
        "bare-uvloop": "bare proxy on uvloop",
        "ours-process": f"prospect-mailer relay ({RELAY_LOOP}, writer process)",
    }.get(kind, f"prospect-mailer relay ({RELAY_LOOP}, writer thread)")
    if workers > 1:
        who += f" x{workers} workers"
    name = f"{who} {msg.stem[8:]} " + ("reused sessions" if reuse else "new sessions")
    result = Result(name, n, wall, cpu, rss, extra={"client_errors": errors[:5]})
    if errors:
        print(f"{name}: smtp-source reported {len(errors)} error line(s): {errors[:3]}")
    return result


def median_round(runs: list[Result]) -> Result:
    """The run of median msgs/s (the lower middle one of an even count), with every run's
    msgs/s in ``extra["rounds_msgs_per_s"]``, in the order run."""
    chosen = sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]
    chosen.extra["rounds_msgs_per_s"] = [round(r.rate, 1) for r in runs]
    errors = [e for r in runs for e in r.extra.get("client_errors", [])]
    if errors:
        chosen.extra["client_errors"] = errors[:5]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--messages",
        type=int,
        default=2000,
        help="2 KB messages per run; 100 KB: a quarter (at least 100); 5 MB: a fiftieth (at "
        "least 10)",
    )
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--sizes", default="2k,100k,5m")
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="also run the relay with this many worker processes ([relay] workers); "
        "the bare proxy stays one process",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each server per configuration, taking turns; the median is shown",
    )
    ap.add_argument(
        "--writers",
        default="thread,process",
        help="the relay's writer settings to run it with (thread, process): each a row",
    )
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "relay.json")
    a = ap.parse_args()
    writers = a.writers.split(",")
    if not writers or set(writers) - {"thread", "process"}:
        ap.error(f"--writers takes thread and/or process, not {a.writers!r}")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        sys.exit(
            "smtp-source not found: install Debian's postfix package (apt-get install postfix)"
        )
    (ROOT / "bench" / ".cache").mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as (sink_port, sink_kind):
        for size in a.sizes.split(","):
            msg = message_file(Path(tmp), size)
            n = {"2k": a.messages, "100k": max(100, a.messages // 4)}.get(
                size, max(10, a.messages // 50)
            )
            for reuse in (True, False):
                results.append(run("direct", sink_port, msg, n, a.sessions, reuse))
                ways: list[tuple[str, int]] = [("bare", 1)]
                if RELAY_LOOP == "uvloop":  # the same proxy on uvloop, for comparison only
                    ways.append(("bare-uvloop", 1))
                for writer in writers:
                    ours = "ours-process" if writer == "process" else "ours"
                    ways += [(ours, workers) for workers in sorted({1, a.workers})]
                rounds: dict[tuple[str, int], list[Result]] = {way: [] for way in ways}
                for i in range(a.rounds):
                    turn = i % len(ways)
                    for kind, workers in ways[turn:] + ways[:turn]:
                        rounds[kind, workers].append(
                            run(kind, sink_port, msg, n, a.sessions, reuse, workers)
                        )
                base = median_round(rounds["bare", 1])
                for way in ways:
                    row = base if way == ("bare", 1) else median_round(rounds[way])
                    if way[0].startswith("ours"):
                        row.baseline = base.name
                    results.append(row)
    print_table(
        f"Relay: smtp-source -> server -> {sink_kind} ({a.sessions} client sessions at once)",
        results,
        a.json,
    )
    failed = [r.name for r in results if r.extra.get("client_errors")]
    if failed:
        sys.exit(f"smtp-source reported errors, these rows are not measurements: {failed}")


if __name__ == "__main__":
    main()
