"""Operations commands: send, audit (issue 5 grows this module)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from ..config import Settings, load_settings
from ..files import iter_prospects, load_campaign
from ..mailer import ProspectMailer, SendSummary
from ..store import Store
from .app import EXIT_BLOCKED, app, console, summary_table


@app.command()
def send(
    campaign_file: Annotated[Path, typer.Argument(help="campaign TOML file")],
    prospects_file: Annotated[Path, typer.Argument(help="prospects CSV file")],
    encoding: Annotated[str, typer.Option(help="CSV text encoding")] = "utf-8-sig",
    force: Annotated[bool, typer.Option(help="send again to recipients already sent")] = False,
) -> None:
    """Send a campaign to a CSV of prospects through the configured transport.

    Example: prospect-mailer send examples/campaign.toml examples/prospects.csv
    """
    campaign = load_campaign(campaign_file)
    settings = load_settings()

    async def run() -> SendSummary:
        async with await ProspectMailer.from_settings(settings) as mailer:
            return await mailer.send_many(
                iter_prospects(prospects_file, encoding=encoding), campaign, force=force
            )

    summary = asyncio.run(run())
    console.print(summary_table(summary))
    if summary.counts["blocked"] or summary.counts["failed"] or summary.counts["deferred"]:
        raise typer.Exit(EXIT_BLOCKED)


audit_app = typer.Typer(help="Inspect the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Check the audit log's hash chain; names the first bad record (exit 1).

    Example: prospect-mailer audit verify
    """
    settings: Settings = load_settings()

    async def run() -> tuple[bool, str]:
        async with await Store.open(settings.database_url) as store:
            r = await store.audit.verify()
        if r.ok:
            return True, f"audit chain verified: {r.count} records"
        return False, f"audit chain BROKEN at record {r.first_bad_seq}: {r.reason}"

    ok, line = asyncio.run(run())
    console.print(line)
    if not ok:
        raise typer.Exit(EXIT_BLOCKED)
