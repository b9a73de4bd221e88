"""Shared helpers for the benchmarks: sinks, messages, measurement, the results table.

Each configuration runs in its own process (``python -m bench.<module> --one CONFIG``) so that
its CPU time and peak RSS are its own; the parent starts the servers, runs every
configuration in turn, and prints the table with each of ours as a ratio to its baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"


@dataclass
class Result:
    """One configuration's figures."""

    name: str
    messages: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    baseline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_seconds / self.messages * 1e6 if self.messages else 0.0


def read_through(path: Path) -> None:
    """Read ``path`` once, so that the OS page cache holds it (as a running service has it)."""
    with path.open("rb") as f:
        while f.read(16 * 1024 * 1024):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def smtp_sink() -> Iterator[tuple[int, str]]:
    """Postfix's C ``smtp-sink`` on 127.0.0.1 (or an aiosmtpd sink when postfix is absent)."""
    port = free_port()
    exe = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if exe:
        cmd = [exe, "-c", "-4"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{port}", "512"]
        kind = "postfix smtp-sink"
    else:
        cmd = [sys.executable, "-m", "bench.aiosmtpd_sink", str(port)]
        kind = "aiosmtpd sink (postfix not installed)"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, kind
    finally:
        proc.terminate()
        proc.wait(10)


def make_message(i: int, size: str) -> EmailMessage:
    """A prospecting message of the requested size class: 2k, 100k or 5m (attachment)."""
    msg = EmailMessage()
    msg["From"] = "ACME Ventes <ventes@acme.example>"
    msg["To"] = f"p{i}@x.example"
    msg["Subject"] = f"Capteurs connectés n°{i}"
    text, html = body_texts(size)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    if size == "5m":
        msg.add_attachment(
            os.urandom(5 * 1024 * 1024), maintype="application", subtype="pdf",
            filename="catalogue.pdf",
        )  # fmt: skip
    return msg


def body_texts(size: str) -> tuple[str, str]:
    """Text and HTML bodies: ~2 KB together for 2k, ~100 KB for 100k (and 5m)."""
    para = (
        "Nos capteurs connectés mesurent température et humidité dans vos entrepôts et vous "
        "alertent avant que la marchandise ne s'abîme. "
    )
    n = 6 if size == "2k" else 330
    text = "Bonjour,\n\n" + "\n".join(para for _ in range(n)) + "\n\nClaire Martin\n"
    html = "<html><body>" + "".join(f"<p>{para}</p>" for _ in range(n)) + "</body></html>"
    return text, html


def measure_start() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure_end(name: str, messages: int, start: tuple[float, float], **extra: Any) -> Result:
    wall = time.perf_counter() - start[0]
    cpu = time.process_time() - start[1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Result(name, messages, wall, cpu, rss, extra=extra)


def run_child(module: str, config: str, args: list[str]) -> Result:
    """Run one configuration in a fresh interpreter; it prints its Result as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--one", config, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {config} failed:\n{out.stdout}\n{out.stderr}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Result(**data)


def emit(result: Result) -> None:
    print(json.dumps(asdict(result)))


def print_table(title: str, results: list[Result], json_path: Path | None = None) -> None:
    by_name = {r.name: r for r in results}
    width = max([44, *(len(r.name) for r in results)])
    print(f"\n{title}")
    header = (
        f"{'configuration':{width}} {'msgs':>7} {'msgs/s':>9} {'CPU µs/msg':>11} "
        f"{'peak RSS MB':>12} {'ratio':>7}  baseline"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio, against = "", ""
        if r.baseline and r.baseline in by_name and by_name[r.baseline].rate:
            ratio, against = f"{r.rate / by_name[r.baseline].rate:.2f}x", r.baseline
        print(
            f"{r.name:{width}} {r.messages:7d} {r.rate:9.0f} {r.cpu_us_per_msg:11.0f} "
            f"{r.peak_rss_mb:12.1f} {ratio:>7}  {against}"
        )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            asdict(r) | {"msgs_per_s": r.rate, "cpu_us_per_msg": r.cpu_us_per_msg} for r in results
        ]
        json_path.write_text(json.dumps({"title": title, "results": rows}, indent=2), "utf-8")
        shown = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
        print(f"(written to {shown})")
