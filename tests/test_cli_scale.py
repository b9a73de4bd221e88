"""100,000 rows through ``prospects import`` and ``send --dry-run``: flat memory, counts add up."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import pytest
from cli_fixtures import HEADER, CliEnv, cli_env_fixture  # noqa: F401

from prospect_mailer.cli import main
from prospect_mailer.store import Store

N = 100_000


def _generate(path: Path, n: int) -> None:
    # Every third prospect has a job function the campaign does not target: blocked.
    with path.open("w", encoding="utf-8") as fh:
        fh.write(HEADER + "\n")
        fh.writelines(
            f"p{i}@co{i % 977}.example,P {i},professional,legitimate_interest,direct,salon,"
            f"acme-capteurs,yes,2026-03-12,{'Chef' if i % 3 == 0 else 'CTO'},FR\n"
            for i in range(n)
        )


class _Sampler:
    """Samples the process's resident memory (RSS) in a thread, every ``interval`` seconds.

    RSS rather than tracemalloc: tracing every allocation makes a 100,000-row run ten times
    slower, and RSS is what a user's machine pays.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self._rss())

    def __enter__(self) -> _Sampler:
        self.samples.append(self._rss())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for RSS")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_100k_import_and_dry_run_in_flat_memory(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    source = cli_env.root / "big.csv"
    _generate(source, N)
    started = time.perf_counter()
    assert main(["prospects", "import", str(source)]) == 0
    imported = time.perf_counter() - started
    assert f"{N} rows, {N} imported, 0 bad" in capsys.readouterr().out

    async def count(store: Store) -> int:
        return await store.prospects.count()

    assert cli_env.store_call(count) == N

    report = cli_env.root / "report.csv"
    started = time.perf_counter()
    with _Sampler() as sampler:
        argv = ["send", str(cli_env.campaign), str(source), "--dry-run", "--show", "5"]
        code = main([*argv, "--report", str(report)])
    dry = time.perf_counter() - started
    assert code == 1  # a third are blocked
    out = capsys.readouterr().out
    blocked = (N + 2) // 3
    with report.open(encoding="utf-8", newline="") as fh:
        statuses: dict[str, int] = {}
        for row in csv.DictReader(fh):
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    assert statuses == {"allowed": N - blocked, "blocked": blocked}
    assert f"Report: {report} ({N} recipients)" in out

    # Flat: resident memory in the last quarter of the run is no higher than in the second
    # quarter, give or take 8 MB; keeping every outcome (over 1 KB each) would add 25+ MB.
    rss = sampler.samples
    assert len(rss) >= 8, rss
    q = len(rss) // 4
    early, late = max(rss[q : 2 * q]), max(rss[3 * q :])
    print(f"import {imported:.1f}s, dry run {dry:.1f}s, RSS {early >> 20} -> {late >> 20} MiB")
    assert late - early < 8 << 20, (early, late)
