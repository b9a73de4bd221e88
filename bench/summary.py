"""The issue's six targets at a glance, from the tables the other benchmarks wrote.

    python -m bench.summary [--results bench/results]

Reads ``bench/results/*.json`` (what ``make bench`` or ``make bench-full`` just wrote), prints
one line per measured target with its figure, the target and the verdict, and writes them to
``summary.json`` beside them. A benchmark that did not run is named as such, never counted as
met. Target 6 (the upstream pool recovering after the sink restarts) is a test of the suite,
not a figure: the line names the test.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import ROOT

#: The tests that prove target 6 (run by ``make test``).
POOL_TESTS = (
    "tests/test_relay_upstream.py::test_restarted_upstream_gives_one_451_then_recovers",
    "tests/test_transport.py::test_dead_pooled_connection_is_retried_once_without_duplicate",
)


@dataclass(frozen=True)
class Line:
    """One target's measure: ``verdict`` is ``ok``, ``MISSED`` or ``not run``."""

    target: int
    measure: str
    figure: str
    wanted: str
    verdict: str


def _line(target: int, measure: str, figure: str, wanted: str, met: bool) -> Line:
    return Line(target, measure, figure, wanted, "ok" if met else "MISSED")


def _load(results: Path, name: str) -> list[dict[str, Any]] | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    rows: list[dict[str, Any]] = json.loads(path.read_text("utf-8"))["results"]
    return rows


def _ratios(rows: list[dict[str, Any]], prefix: str, target: int, floor: float) -> Iterator[Line]:
    """Ours (rows named ``prefix...`` with a baseline) against their baselines' msgs/s."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["name"].startswith(prefix) and r.get("baseline") in by_name:
            base = by_name[r["baseline"]]
            ratio = r["msgs_per_s"] / base["msgs_per_s"]
            yield _line(
                target,
                r["name"],
                f"{ratio:.2f}x ({r['msgs_per_s']:,.0f} vs {base['msgs_per_s']:,.0f} msgs/s)",
                f">= {floor}x",
                ratio >= floor,
            )


def _suppression(rows: list[dict[str, Any]]) -> Iterator[Line]:
    for r in rows:
        if r.get("target_us") is not None:
            p50, target = r["p50_us"], r["target_us"]
            shown = f"{p50 / 1000:.1f} ms" if target >= 1000 else f"{p50:.0f} µs"
            wanted = f"< {target / 1000:g} ms" if target >= 1000 else f"< {target:g} µs"
            yield _line(3, r["measure"].strip(), f"p50 {shown}", wanted, p50 < target)


def _audit(rows: list[dict[str, Any]]) -> Iterator[Line]:
    for r in rows:
        if r["configuration"].startswith("group commit"):
            rate = r["records_per_s"]
            figure = f"{rate:,.0f} records/s"
            yield _line(4, f"audit: {r['configuration']}", figure, ">= 5,000/s", rate >= 5000)


def _memory(rows: list[dict[str, Any]]) -> Iterator[Line]:
    for r in rows:
        if r.get("target_mb") is not None:
            rss, most = r["peak_rss_mb"], r["target_mb"]
            yield _line(
                5, f"peak RSS: {r['measure']}", f"{rss:.0f} MB", f"< {most:g} MB", rss < most
            )
        elif "ms" in r:
            yield _line(5, r["measure"], f"{r['ms']:.0f} ms", "< 100 ms", r["ms"] < 100)


#: ``(target, results file and bench module, what it measures, its lines from the rows)``.
SOURCES: tuple[tuple[int, str, str, Callable[[list[dict[str, Any]]], Iterable[Line]]], ...] = (
    (1, "library", "library send_many vs raw aiosmtplib",
     lambda rows: _ratios(rows, "prospect-mailer send_many", 1, 0.8)),
    (2, "relay", "relay vs the bare proxy",
     lambda rows: _ratios(rows, "prospect-mailer relay", 2, 0.6)),
    (3, "suppression", "suppression checks", _suppression),
    (4, "audit", "audit records, group commit", _audit),
    (5, "memory", "memory and responsiveness", _memory),
)  # fmt: skip


def lines(results: Path) -> list[Line]:
    """Every target's lines from the JSON files under ``results``."""
    out: list[Line] = []
    for target, name, what, read in SOURCES:
        rows = _load(results, name)
        if rows is None:
            out.append(Line(target, what, "", "", f"not run (python -m bench.{name})"))
        else:
            out += read(rows)
    pool = "see make test (POOL_TESTS in bench/summary.py)"
    out.append(Line(6, "upstream pool after the sink restarts", "a test", "recovers", pool))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    if not a.results.is_dir():
        ap.error(f"--results: no such directory: {a.results}")
    found = lines(a.results)
    width = max(len(x.measure) for x in found)
    print(f"\nIssue 6 targets, from {a.results}")
    print(f"{'#':>2} {'measure':{width}} {'figure':>38} {'target':>12}  verdict")
    for x in found:
        print(f"{x.target:>2} {x.measure:{width}} {x.figure:>38} {x.wanted:>12}  {x.verdict}")
    missed = sum(x.verdict == "MISSED" for x in found)
    not_run = sum(x.verdict.startswith("not run") for x in found)
    print(f"{missed} missed, {not_run} not run, of {len(found)} lines")
    (a.results / "summary.json").write_text(
        json.dumps([asdict(x) for x in found], indent=2, ensure_ascii=False), "utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
