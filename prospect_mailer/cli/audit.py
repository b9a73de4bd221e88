"""``prospect-mailer audit export|verify``: the tamper-evident log, out and checked."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Annotated, Literal

import typer

from ..addresses import normalise
from ..store import AuditRecord
from .app import EXIT_BLOCKED, app, console
from .common import echo_json, err_console, open_store, parse_when

__all__ = ["AUDIT_COLUMNS", "audit_app"]

audit_app = typer.Typer(help="Export and verify the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

#: Columns of an audit export, in order (the hashes let anyone re-verify the chain).
AUDIT_COLUMNS: tuple[str, ...] = (
    "seq", "created_at", "kind", "status", "campaign_id", "step", "advertiser_id", "purpose",
    "recipient_hash", "recipient_masked", "message_id", "transport", "rule_ids", "send_id",
    "event_id", "details", "prev_hash", "hash",
)  # fmt: skip


def _row(r: AuditRecord) -> dict[str, object]:
    return {
        "seq": r.seq,
        "created_at": r.created_at.isoformat(),
        "kind": r.kind,
        "status": r.status,
        "campaign_id": r.campaign_id,
        "step": r.step,
        "advertiser_id": r.advertiser_id,
        "purpose": r.purpose,
        "recipient_hash": r.recipient_hash,
        "recipient_masked": r.recipient_masked,
        "message_id": r.message_id,
        "transport": r.transport,
        "rule_ids": list(r.rule_ids),
        "send_id": r.send_id,
        "event_id": r.event_id,
        "details": r.details,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    }


@audit_app.command("export")
def audit_export(
    fmt: Annotated[
        Literal["jsonl", "csv"], typer.Option("--format", help="jsonl (one record a line) or csv")
    ] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="file to write (default stdout)")] = None,
    campaign: Annotated[str | None, typer.Option(help="only this campaign id")] = None,
    since: Annotated[str | None, typer.Option(help="from this date/time (UTC, inclusive)")] = None,
    until: Annotated[
        str | None, typer.Option(help="before this date/time (UTC, exclusive)")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="only this status: sent, blocked, pending, failed...")
    ] = None,
    recipient: Annotated[str | None, typer.Option(help="only this address (by its hash)")] = None,
    unresolved: Annotated[
        bool,
        typer.Option(
            "--unresolved",
            help="only sends still pending: no sent/failed/deferred record followed (a crash "
            "or Ctrl-C in flight; the message may or may not have left)",
        ),
    ] = False,
) -> None:
    """Export audit records (streamed), optionally filtered by campaign, dates and status.

    CSV cells: rule_ids separated by ';', details as JSON text. ``--unresolved`` keeps the
    ``pending`` records of sends that never got a final record (it holds one record per
    unresolved send in memory).

    Example: prospect-mailer audit export --format csv --since 2026-03-01 --status blocked
    """
    start, end = parse_when(since, "--since"), parse_when(until, "--until")
    key = normalise(recipient).key_hash if recipient else None

    async def run(out: IO[str]) -> int:
        writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if writer is not None:
            writer.writerow(AUDIT_COLUMNS)
        n = 0
        async with open_store() as store:
            records = store.audit.iter_events(
                campaign_id=campaign,
                status=None if unresolved else status,
                since=start,
                until=end,
                recipient_hash=key,
            )
            async for r in _unresolved(records) if unresolved else records:
                row = _row(r)
                if writer is None:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    row["rule_ids"] = ";".join(r.rule_ids)
                    row["details"] = r.details_json
                    writer.writerow([row[c] for c in AUDIT_COLUMNS])
                n += 1
        return n

    if output is None:
        n = asyncio.run(run(sys.stdout))
    else:
        with output.open("w", encoding="utf-8", newline="") as fh:
            n = asyncio.run(run(fh))
    err_console.print(f"{n} audit record(s) exported", markup=False)


@audit_app.command("verify")
def audit_verify(
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check the audit log's hash chain; names the first bad record (exit 1).

    Example: prospect-mailer audit verify
    """

    async def run() -> tuple[bool, int, int | None, str]:
        async with open_store() as store:
            r = await store.audit.verify()
            return r.ok, r.count, r.first_bad_seq, r.reason

    ok, count, bad, reason = asyncio.run(run())
    if json_out:
        echo_json({"ok": ok, "records": count, "first_bad_record": bad, "reason": reason})
    elif ok:
        console.print(f"audit chain verified: {count} records")
    else:
        console.print(f"audit chain BROKEN at record {bad}: {reason}", markup=False)
    if not ok:
        raise typer.Exit(EXIT_BLOCKED)


async def _unresolved(records: AsyncIterator[AuditRecord]) -> AsyncIterator[AuditRecord]:
    """The ``pending`` send records that no final record (sent/failed/deferred) followed."""
    open_sends: dict[str, AuditRecord] = {}
    async for r in records:
        if r.kind != "send" or not r.send_id:
            continue
        if r.status == "pending":
            open_sends[r.send_id] = r
        elif r.status in ("sent", "failed", "deferred"):
            open_sends.pop(r.send_id, None)
    for r in sorted(open_sends.values(), key=lambda rec: rec.seq):
        yield r
