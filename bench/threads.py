"""Where a relayed message's CPU goes, thread by thread: the relay against the bare proxy.

    python -m bench.threads [--messages 2000] [--size 2k] [--new-sessions] [--strace]

Runs the same ``smtp-source -> server -> smtp-sink`` path as ``bench.relay``, one server at a
time, and reads ``/proc/<pid>/task/*/stat`` and ``status`` before and after the measured
messages (after 200 of warm-up): per thread, user and system CPU time and voluntary and forced
context switches per message. ``--strace`` also counts the system calls per message
(``strace -c -f`` attached for the measured messages; it slows the server, so its msgs/s
line is not a measurement). Linux only; the figures behind the README's per-thread paragraph.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import CACHE, smtp_sink
from .relay import drive, message_file, serving

_TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[str, float, float, int, int]]:
    """``{tid: (name, user s, system s, voluntary switches, forced switches)}``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
            name = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        out[task.name] = (
            name,
            int(fields[11]) / _TICK,
            int(fields[12]) / _TICK,
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        )
    return out


def strace_counts(path: Path, messages: int) -> list[tuple[str, float]]:
    """``(syscall, calls per message)`` from an ``strace -c`` summary, most frequent first."""
    counts = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            counts.append((f[-1], int(f[3]) / messages))
    return sorted(counts, key=lambda c: -c[1])


def profile(kind: str, sink: int, msg: Path, n: int, reuse: bool, trace: bool) -> None:
    with serving(kind, sink, n + 210) as (server, port), tempfile.TemporaryDirectory() as tmp:
        drive(port, msg, 200, 10, reuse)  # warm-up
        trace_out = Path(tmp) / "strace.txt"
        tracer = None
        if trace:
            tracer = subprocess.Popen(
                ["strace", "-f", "-c", "-o", str(trace_out), "-p", str(server.pid)],
                stderr=subprocess.DEVNULL,
            )
            wait_attached(server.pid)
        before = threads(server.pid)
        wall, errors = drive(port, msg, n, 10, reuse)
        after = threads(server.pid)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
        label = "bare proxy" if kind == "bare" else "prospect-mailer relay"
        sessions = "reused sessions" if reuse else "a new session per message"
        note = " (under strace: only the system call counts are measurements)" if trace else ""
        print(f"\n{label}, {msg.stem[8:]}, {sessions}: {n / wall:.0f} msgs/s{note}")
        if errors:
            print(f"  smtp-source reported errors: {errors[:3]}")
        head = f"{'user µs':>9} {'sys µs':>8} {'voluntary':>10} {'forced':>7}"
        print(f"  {'thread':24} {head}  per message")
        total_user = total_sys = 0.0
        for tid, (name, user, system, vol, forced) in sorted(after.items()):
            _, user0, system0, vol0, forced0 = before.get(tid, (name, 0.0, 0.0, 0, 0))
            du, ds = (user - user0) / n * 1e6, (system - system0) / n * 1e6
            total_user, total_sys = total_user + du, total_sys + ds
            if du + ds >= 1 or vol - vol0 >= n // 10:
                # Python names no OS thread before 3.14: the main one is the event loop's;
                # in the relay the busy other one is the store's writer.
                name = "main (event loop)" if tid == str(server.pid) else f"{name} {tid}"
                print(f"  {name[:24]:24} {du:9.0f} {ds:8.0f} {(vol - vol0) / n:10.2f} "
                      f"{(forced - forced0) / n:7.2f}")  # fmt: skip
        print(f"  {'all threads':24} {total_user:9.0f} {total_sys:8.0f}")
        if trace:
            calls = strace_counts(trace_out, n)
            print("  system calls per message: " + ", ".join(f"{c} {v:.2f}" for c, v in calls[:12]))


def wait_attached(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is traced (``TracerPid`` set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        if all("TracerPid:\t0" not in (t / "status").read_text() for t in tasks if t.exists()):
            return
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", default="2k", choices=["2k", "100k", "5m"])
    ap.add_argument("--new-sessions", action="store_true", help="a new session per message")
    ap.add_argument("--strace", action="store_true", help="also count system calls (strace)")
    a = ap.parse_args()
    if not Path("/proc/self/task").exists():
        sys.exit("bench.threads reads /proc: Linux only")
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        sys.exit(
            "smtp-source not found: install Debian's postfix package (apt-get install postfix)"
        )
    if a.strace and not shutil.which("strace"):
        sys.exit("--strace needs strace (apt-get install strace)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as (sink, _):
        msg = message_file(Path(tmp), a.size)
        for kind in ("bare", "ours"):
            profile(kind, sink, msg, a.messages, not a.new_sessions, a.strace)


if __name__ == "__main__":
    main()
