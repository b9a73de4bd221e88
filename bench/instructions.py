"""Instructions per relayed message, counted by callgrind: the relay against the bare proxy.

    python -m bench.instructions [--messages 400] [--sizes 2k] [--sessions 10]

Throughput on a shared VM moves by a factor of two between runs (steal time, neighbours'
caches), so a change of a few percent cannot be seen in ``bench.relay``'s msgs/s. Counting the
instructions the server executes is deterministic to about 2%: each server runs under valgrind's
callgrind with counting switched off, takes 20 messages to warm up, then counts exactly
``--messages`` more (``smtp-source`` drives them, ``smtp-sink`` absorbs them, as in
``bench.relay``). The bare proxy is the baseline; the ratio is ours over theirs (lower is
cheaper). User-space instructions only: system calls and the machine's cache behaviour are not
in this figure (``bench.relay`` measures those, as time). Needs Debian's ``valgrind`` and
``postfix`` packages (``make bench-tools`` installs both when run as root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, free_port, smtp_sink, wait_port
from .relay import drive, message_file

WARM_UP = 20


def _callgrind_total(out_dir: Path) -> int:
    """The instructions counted while counting was on (summed over the dump files)."""
    total = 0
    for path in out_dir.glob("callgrind.out.*"):
        for line in path.read_text("utf-8", "replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def count(kind: str, sink_port: int, msg: Path, n: int, sessions: int, reuse: bool) -> int:
    """Instructions the server (``ours`` or ``bare``) executes for ``n`` messages."""
    port = free_port()
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / ".cache") as tmp:
        out = Path(tmp)
        if kind == "bare":
            server = [sys.executable, "-m", "bench.bare_proxy", str(port), str(sink_port)]
        else:
            server = [sys.executable, "-m", "bench.relay_server", str(out / "relay.db"),
                      str(port), str(sink_port), str(n + WARM_UP + 10), "1"]  # fmt: skip
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}/callgrind.out.%p", *server]  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        try:
            if kind == "ours":
                assert proc.stdout is not None
                proc.stdout.readline()  # "ready" once the prospects are registered
            wait_port(port, 300)
            _, errors = drive(port, msg, WARM_UP, sessions, reuse)

            def control(*args: str) -> None:
                subprocess.run(
                    ["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True
                )

            control("-i", "on")
            _, more = drive(port, msg, n, sessions, reuse)
            time.sleep(1)  # the last replies' bookkeeping (claims, audit) is counted too
            control("-i", "off")
            control("-d")
            errors += more
            if errors:
                sys.exit(f"{kind}: smtp-source reported errors, not a measurement: {errors[:3]}")
        finally:
            proc.terminate()
            proc.wait(60)
        return _callgrind_total(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--sizes", default="2k")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "instructions.json")
    a = ap.parse_args()
    missing = [t for t in ("valgrind", "callgrind_control") if not shutil.which(t)]
    if missing:
        sys.exit(f"{', '.join(missing)} not found: install Debian's valgrind package")
    (ROOT / "bench" / ".cache").mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, smtp_sink() as (sink_port, _):
        for size in a.sizes.split(","):
            msg = message_file(Path(tmp), size)
            for reuse in (True, False):
                how = "reused sessions" if reuse else "new sessions"
                bare = count("bare", sink_port, msg, a.messages, a.sessions, reuse) / a.messages
                ours = count("ours", sink_port, msg, a.messages, a.sessions, reuse) / a.messages
                rows.append({"size": size, "sessions": how, "bare_proxy": bare, "relay": ours})
    print(f"\nInstructions per message (callgrind, {a.messages} messages after {WARM_UP})")
    print(f"{'message':10} {'sessions':16} {'bare proxy':>12} {'relay':>12} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['size']:10} {r['sessions']:16} {r['bare_proxy'] / 1e6:10.2f} M "
            f"{r['relay'] / 1e6:10.2f} M {r['relay'] / r['bare_proxy']:6.2f}x"
        )
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"messages": a.messages, "results": rows}, indent=2), "utf-8")
    shown = a.json.relative_to(ROOT) if a.json.is_relative_to(ROOT) else a.json
    print(f"(written to {shown})")


if __name__ == "__main__":
    main()
