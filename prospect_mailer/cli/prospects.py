"""``prospect-mailer prospects import|export|purge``: the prospect registry.

``import`` reads the CSV twice, streaming: a first pass validates every row and stops on what
makes the file unreadable (wrong encoding, unknown column: exit 2, nothing imported); the
second registers every good row whole (never part of a row). Then:

* bad rows are listed by line and column and the exit code is 2 (bad input), the good rows
  being imported all the same;
* addresses already on the suppression list (address or domain, any scope) are listed and
  **not** imported (docs/RULES.md SUPP_SURVIVES_DELETION), unless ``--include-suppressed`` (they
  stay blocked at send); the exit code is then 1;
* otherwise 0.

``purge`` applies FR_PROSPECT_RETENTION_3Y (see :mod:`prospect_mailer.retention`).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.table import Table

from ..lists import ImportReport, export_prospects, import_prospects, scan_prospects
from ..retention import PurgeReport, purge_expired
from ..store import AuditEvent
from .app import EXIT_BAD_INPUT, EXIT_BLOCKED, app, console
from .common import echo_json, err_console, open_store, parse_when
from .send import print_bad_rows

__all__ = ["prospects_app"]

prospects_app = typer.Typer(
    help="Import, export and purge registered prospects.", no_args_is_help=True
)
app.add_typer(prospects_app, name="prospects")


def _report_import(file: Path, r: ImportReport, *, include_suppressed: bool) -> None:
    if r.problems:
        print_bad_rows(r.problems, r.bad, file, "those rows were not imported")
    if r.suppressed_rows:
        what = "imported anyway (still blocked at send)" if include_suppressed else "not imported"
        table = Table(title=f"{r.suppressed} address(es) on the suppression list: {what}")
        for col in ("email", "entry", "scope", "reason", "since"):
            table.add_column(col)
        for s in r.suppressed_rows:
            scope = s.scope + (f" {s.scope_value}" if s.scope_value else "")
            table.add_row(s.email, s.kind, scope, s.reason, s.since.date().isoformat())
        console.print(table)
        if r.suppressed > len(r.suppressed_rows):
            console.print(f"  ... and {r.suppressed - len(r.suppressed_rows)} more", markup=False)
    console.print(
        f"{file}: {r.rows} rows, {r.imported} imported, {r.bad} bad, "
        f"{r.suppressed_skipped} suppressed and skipped",
        markup=False,
    )


@prospects_app.command("import")
def prospects_import(
    file: Annotated[Path, typer.Argument(help="prospects CSV (comma or semicolon, header row)")],
    encoding: Annotated[str, typer.Option(help="text encoding, e.g. latin-1")] = "utf-8-sig",
    include_suppressed: Annotated[
        bool, typer.Option(help="also register suppressed addresses (still blocked at send)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Register prospects from a CSV: good rows imported, bad rows listed by line and column.

    Exit 2 if any row is bad (the good ones are imported), 1 if suppressed addresses were
    found, 0 otherwise.

    Example: prospect-mailer prospects import salon-2026.csv --encoding latin-1
    """
    scan_prospects(
        file, encoding=encoding, max_listed=0
    )  # unreadable file: exit 2, nothing written

    async def run() -> ImportReport:
        async with open_store() as store:
            r = await import_prospects(
                store, file, encoding=encoding, include_suppressed=include_suppressed
            )
            await store.audit.append(
                [
                    AuditEvent(
                        kind="prospects",
                        status="imported",
                        transport="cli",
                        details={
                            "file": file.name,
                            "rows": r.rows,
                            "imported": r.imported,
                            "bad": r.bad,
                            "suppressed": r.suppressed,
                            "include_suppressed": include_suppressed,
                        },
                    )
                ]
            )
            return r

    r = asyncio.run(run())
    if json_out:
        echo_json(
            {
                "file": str(file),
                "rows": r.rows,
                "imported": r.imported,
                "bad": r.bad,
                "suppressed": r.suppressed,
                "suppressed_skipped": r.suppressed_skipped,
                "bad_rows": [
                    {"line": p.line, "column": p.column, "problem": p.reason} for p in r.problems
                ],
                "suppressed_rows": [s.email for s in r.suppressed_rows],
            }
        )
    else:
        _report_import(file, r, include_suppressed=include_suppressed)
    if r.bad:
        raise typer.Exit(EXIT_BAD_INPUT)
    if r.suppressed:
        raise typer.Exit(EXIT_BLOCKED)


@prospects_app.command("export")
def prospects_export(
    output: Annotated[Path | None, typer.Option(help="CSV file to write (default stdout)")] = None,
    include_suppressed: Annotated[
        bool, typer.Option(help="include addresses on the suppression list")
    ] = False,
) -> None:
    """Export the registry as a CSV that imports back as is (UTF-8, comma).

    Suppressed addresses are left out unless --include-suppressed (an opted-out address is
    not passed on: docs/RULES.md US_CANSPAM_NO_OPTOUT_TRANSFER).

    Example: prospect-mailer prospects export --output prospects.csv
    """

    async def run(out: IO[str]) -> tuple[int, int]:
        async with open_store() as store:
            return await export_prospects(store, out, include_suppressed=include_suppressed)

    if output is None:
        written, left_out = asyncio.run(run(sys.stdout))
    else:
        with output.open("w", encoding="utf-8", newline="") as fh:
            written, left_out = asyncio.run(run(fh))
    err_console.print(
        f"{written} prospect(s) exported, {left_out} suppressed left out", markup=False
    )


@prospects_app.command("purge")
def prospects_purge(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list only; change nothing")] = False,
    now: Annotated[
        str | None, typer.Option(help="the date to judge retention at (default now)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Purge prospects past retention (FR_PROSPECT_RETENTION_3Y: 3 years after collection or
    the prospect's last own contact; customers 3 years after the relationship ends).

    Each purged address first gets a global suppression entry (reason manual, source
    retention-purge: SUPP_SURVIVES_DELETION), then an audit record, then its profile is
    deleted. Undated prospects are kept and counted. Run with --dry-run first.

    Example: prospect-mailer prospects purge --dry-run
    """
    when = parse_when(now, "--now") or datetime.now(UTC)

    async def run() -> PurgeReport:
        async with open_store() as store:
            return await purge_expired(store, now=when, dry_run=dry_run)

    r = asyncio.run(run())
    if json_out:
        echo_json(
            {
                "dry_run": dry_run,
                "examined": r.examined,
                "expired": r.expired,
                "purged": r.purged,
                "current_customers": r.current_customers,
                "undated": r.undated,
                "candidates": [
                    {
                        "email": c.email,
                        "reference": c.reference.isoformat(),
                        "expired_at": c.expires_at.isoformat(),
                    }
                    for c in r.candidates
                ],
            }
        )
        return
    if r.candidates:
        verb = "would be purged" if dry_run else "purged"
        table = Table(title=f"{r.expired} prospect(s) past retention {verb}")
        for col in ("email", "last prospect contact", "retention ended"):
            table.add_column(col)
        for c in r.candidates:
            table.add_row(c.email, c.reference.date().isoformat(), c.expires_at.date().isoformat())
        console.print(table)
    console.print(
        f"{r.examined} examined, {r.expired} past retention, {r.purged} purged, "
        f"{r.current_customers} current customers kept, {r.undated} undated kept"
        + (" (dry run: nothing changed)" if dry_run else ""),
        markup=False,
    )
