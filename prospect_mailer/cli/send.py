"""``prospect-mailer send``: a campaign to a CSV of prospects, with progress, dry run and report.

Two streaming passes over the CSV, both in constant memory: the first validates every row
(a bad row refuses the whole run before anything is sent, and every bad row is listed by line
and column); the second sends through :meth:`ProspectMailer.iter_send`, the one pipeline.
Ctrl-C cancels the messages in flight, flushes the audit log and exits 130; running the same
command again resumes: the send claims make what was already sent (or is ``pending``, i.e.
handed to the transport when interrupted) a ``duplicate``, never a second message.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ..errors import DataFileError
from ..files import iter_prospects, load_campaign
from ..lists import scan_prospects
from ..mailer import ProspectMailer, SendSummary
from ..models import Campaign, Outcome
from .app import EXIT_BAD_INPUT, EXIT_BLOCKED, app, console, outcome_table, summary_table
from .common import echo_json, err_console, settings

__all__ = ["ReportWriter", "print_bad_rows", "send"]

_NOT_OK = ("blocked", "failed", "deferred")


class _Rate(ProgressColumn):
    """Recipients per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="progress.data.speed")


class ReportWriter:
    """Streams each recipient's outcome to ``FILE.csv`` or ``FILE.json`` (constant memory).

    CSV columns: ``email, status, rule_ids`` (``;``-separated), ``detail, send_id,
    message_id``. JSON: ``{"campaign", "step", "dry_run", "outcomes": [...], "totals",
    "blocked_by_rule"}``, the totals written last.
    """

    def __init__(self, path: Path, campaign: Campaign, *, dry_run: bool) -> None:
        if path.suffix.lower() not in (".csv", ".json"):
            raise typer.BadParameter(
                "the report must be a .csv or .json file", param_hint="--report"
            )
        self.path = path
        self.json = path.suffix.lower() == ".json"
        self._fh: IO[str] = path.open("w", encoding="utf-8", newline="")
        self._first = True
        if self.json:
            head = {"campaign": campaign.id, "step": campaign.step, "dry_run": dry_run}
            self._fh.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "outcomes": [\n')
            self._csv = None
        else:
            self._csv = csv.writer(self._fh, lineterminator="\n")
            self._csv.writerow(["email", "status", "rule_ids", "detail", "send_id", "message_id"])

    def write(self, o: Outcome) -> None:
        """Add one outcome."""
        if self._csv is not None:
            self._csv.writerow(
                [
                    o.email,
                    o.status,
                    ";".join(o.rule_ids),
                    o.detail,
                    o.send_id or "",
                    o.message_id or "",
                ]
            )
            return
        row = {
            "email": o.email,
            "status": o.status,
            "rule_ids": list(o.rule_ids),
            "detail": o.detail,
            "send_id": o.send_id,
            "message_id": o.message_id,
        }
        self._fh.write(("" if self._first else ",\n") + json.dumps(row, ensure_ascii=False))
        self._first = False

    def close(self, summary: SendSummary) -> None:
        """Write the totals (JSON) and close the file."""
        if self.json:
            tail = {
                "totals": dict(summary.counts),
                "blocked_by_rule": dict(summary.blocked_by_rule),
            }
            self._fh.write("\n], " + json.dumps(tail, ensure_ascii=False)[1:] + "\n")
        self._fh.close()

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._fh.closed:
            self._fh.close()


def print_bad_rows(problems: Sequence[DataFileError], bad: int, path: Path, what: str) -> None:
    """List the bad rows of a CSV (file:line [column]: problem)."""
    console.print(f"[bold red]{bad} bad row(s) in {path}[/]: {what}", soft_wrap=True, markup=True)
    for p in problems:
        console.print(f"  {p}", soft_wrap=True, markup=False)
    if bad > len(problems):
        console.print(f"  ... and {bad - len(problems)} more", markup=False)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "[green]{task.fields[ok]} {task.fields[ok_label]}[/] "
            "[red]{task.fields[blocked]} blocked[/] "
            "[bold red]{task.fields[failed]} failed[/] "
            "[cyan]{task.fields[duplicate]} dup[/]"
        ),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
    )


@app.command()
def send(
    campaign_file: Annotated[Path, typer.Argument(help="campaign TOML file")],
    prospects_file: Annotated[Path, typer.Argument(help="prospects CSV file (comma or semicolon)")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="decide every recipient, send and record nothing")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="write each recipient's outcome to FILE.csv or FILE.json")
    ] = None,
    encoding: Annotated[str, typer.Option(help="CSV text encoding, e.g. latin-1")] = "utf-8-sig",
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=1000, help="messages in flight (default: settings)")
    ] = None,
    force: Annotated[bool, typer.Option(help="send again to recipients already sent")] = False,
    show: Annotated[int, typer.Option(min=0, help="recipients listed on screen")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="print the totals as JSON")] = False,
) -> None:
    """Send a campaign to a CSV of prospects through the configured transport.

    The CSV is validated completely first: a bad row refuses the run (exit 2) before anything
    is sent. Exit 1 if any recipient was blocked or failed. Ctrl-C stops cleanly; run the
    same command again to resume (nothing is sent twice).

    Example: prospect-mailer send campaign.toml prospects.csv --dry-run --report report.csv
    """
    campaign = load_campaign(campaign_file)
    scan = scan_prospects(prospects_file, encoding=encoding)
    if scan.bad:
        print_bad_rows(scan.problems, scan.bad, prospects_file, "nothing was sent")
        raise typer.Exit(EXIT_BAD_INPUT)
    config = settings()
    writer = ReportWriter(report, campaign, dry_run=dry_run) if report else None
    shown: list[Outcome] = []
    summary = SendSummary()
    verb = "dry run" if dry_run else "sending"

    async def run() -> None:
        async with await ProspectMailer.from_settings(config) as mailer:
            with _progress() as progress:
                task = progress.add_task(
                    f"{campaign.id} {verb}",
                    total=scan.good,
                    ok=0,
                    ok_label="allowed" if dry_run else "sent",
                    blocked=0,
                    failed=0,
                    duplicate=0,
                )
                async for outcome in mailer.iter_send(
                    iter_prospects(prospects_file, encoding=encoding),
                    campaign,
                    concurrency=concurrency,
                    force=force,
                    dry_run=dry_run,
                ):
                    summary.add(outcome)
                    if writer is not None:
                        writer.write(outcome)
                    if len(shown) < show:
                        shown.append(outcome)
                    c = summary.counts
                    progress.update(
                        task,
                        advance=1,
                        ok=c["sent"] + c["allowed"],
                        blocked=c["blocked"],
                        failed=c["failed"] + c["deferred"],
                        duplicate=c["duplicate"],
                    )

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        console.print(summary_table(summary))  # what was done before the interruption
        console.print(
            "[yellow]interrupted[/]: in-flight messages cancelled, audit log flushed; "
            "run the same command again to resume (nothing is sent twice)"
        )
        raise
    finally:
        if writer is not None:
            writer.close(summary)
    _print_result(campaign, summary, shown, scan.good, report, dry_run=dry_run, as_json=json_out)
    if any(summary.counts[s] for s in _NOT_OK):
        raise typer.Exit(EXIT_BLOCKED)


def _print_result(
    campaign: Campaign,
    summary: SendSummary,
    shown: list[Outcome],
    total: int,
    report: Path | None,
    *,
    dry_run: bool,
    as_json: bool,
) -> None:
    if as_json:
        echo_json(
            {
                "campaign": campaign.id,
                "step": campaign.step,
                "dry_run": dry_run,
                "recipients": summary.total,
                "totals": dict(summary.counts),
                "blocked_by_rule": dict(summary.blocked_by_rule),
                "report": str(report) if report else None,
            }
        )
        return
    title = f"Campaign {campaign.id} step {campaign.step}" + (" (dry run)" if dry_run else "")
    if shown:
        more = f", first {len(shown)} of {total}" if total > len(shown) else ""
        console.print(outcome_table(shown, f"{title}{more}"))
    console.print(summary_table(summary))
    if report:
        console.print(f"Report: {report} ({summary.total} recipients)", markup=False)
    if dry_run:
        console.print("Dry run: nothing was sent or recorded.")
