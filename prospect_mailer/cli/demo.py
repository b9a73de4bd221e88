"""``prospect-mailer demo``: the example campaign through a local outbox."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Annotated

import typer

from ..config import load_settings
from ..files import load_campaign, load_prospects
from ..mailer import ProspectMailer, SendSummary
from ..models import Outcome
from .app import app, console, outcome_table, summary_table

DEMO_BASE_URL = "https://optout.acme-capteurs.example"


@app.command()
def demo(
    examples: Annotated[
        Path, typer.Option(help="folder holding campaign.toml and prospects.csv")
    ] = Path("examples"),
    output: Annotated[
        Path, typer.Option(help="working folder (recreated): database, outbox, key")
    ] = Path("demo-output"),
) -> None:
    """Send the example campaign to the example prospects through a local outbox.

    Nothing leaves the machine. Example: prospect-mailer demo
    """
    campaign = load_campaign(examples / "campaign.toml")
    prospects = load_prospects(examples / "prospects.csv")
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    settings = load_settings(
        database_url=f"sqlite+aiosqlite:///{output / 'prospect-mailer.db'}",
        outbox_dir=output / "outbox",
        secret_key_file=output / "prospect-mailer.key",
        base_url=DEMO_BASE_URL,
        smtp_url=None,
    )

    async def run() -> tuple[list[Outcome], str]:
        async with await ProspectMailer.from_settings(settings) as mailer:
            # One prospect objected earlier (e.g. clicked an unsubscribe link): the suppression
            # list must stop the send whatever else the file says.
            await mailer.store.suppression.add_address(
                "camille.blanc@optout-demo.example",
                scope="advertiser",
                scope_value=campaign.advertiser.id,
                reason="unsubscribe",
                source="demo",
            )
            outcomes = [o async for o in mailer.iter_send(prospects, campaign)]
            verified = await mailer.store.audit.verify()
            return outcomes, (
                f"audit chain verified: {verified.count} records"
                if verified.ok
                else f"audit chain BROKEN at record {verified.first_bad_seq}: {verified.reason}"
            )

    outcomes, audit_line = asyncio.run(run())
    console.print(outcome_table(outcomes, f"Campaign {campaign.id}: {len(outcomes)} prospects"))
    summary = SendSummary()
    for o in outcomes:
        summary.add(o)
    console.print(summary_table(summary))
    console.print(f"Messages written to   {settings.outbox_dir.resolve()}/ (.eml files)")
    console.print(f"Audit log and lists   {(output / 'prospect-mailer.db').resolve()}")
    console.print(audit_line)
