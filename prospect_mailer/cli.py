"""The ``prospect-mailer`` command line (typer + rich).

``main(argv)`` is what the console script calls; tests call it directly. Exit codes: 0 ok,
1 some recipients blocked/failed or a check failed, 2 bad input or configuration.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .config import Settings, load_settings
from .errors import ProspectMailerError
from .files import iter_prospects, load_campaign, load_prospects
from .mailer import ProspectMailer, SendSummary
from .models import Outcome
from .store import Store

__all__ = ["app", "main"]

app = typer.Typer(
    name="prospect-mailer",
    help="Send prospecting email with CNIL/GDPR rules enforced at send time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)

EXIT_OK, EXIT_BLOCKED, EXIT_BAD_INPUT = 0, 1, 2
_STYLE = {
    "sent": "green",
    "blocked": "red",
    "failed": "bold red",
    "deferred": "yellow",
    "duplicate": "cyan",
}
DEMO_BASE_URL = "https://optout.acme-capteurs.example"


def _outcome_table(outcomes: Sequence[Outcome], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("recipient")
    table.add_column("status")
    table.add_column("rule ids / reply")
    for o in outcomes:
        if o.rule_ids:
            why = ", ".join(o.rule_ids)
        elif o.status == "sent" and o.smtp_reply.startswith("written to "):
            why = "outbox: " + Path(o.smtp_reply.removeprefix("written to ")).name
        else:
            why = o.smtp_reply or o.detail
        style = _STYLE.get(o.status, "")
        table.add_row(o.email, f"[{style}]{o.status}[/{style}]", why)
    return table


def _summary_table(summary: SendSummary) -> Table:
    table = Table(title="Totals")
    table.add_column("status / rule")
    table.add_column("count", justify="right")
    for status, n in sorted(summary.counts.items()):
        table.add_row(status, str(n))
    for rule, n in summary.blocked_by_rule.most_common():
        table.add_row(f"  blocked by {rule}", str(n))
    return table


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
    console.print(_outcome_table(outcomes, f"Campaign {campaign.id}: {len(outcomes)} prospects"))
    summary = SendSummary()
    for o in outcomes:
        summary.add(o)
    console.print(_summary_table(summary))
    console.print(f"Messages written to   {settings.outbox_dir.resolve()}/ (.eml files)")
    console.print(f"Audit log and lists   {(output / 'prospect-mailer.db').resolve()}")
    console.print(audit_line)


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
    console.print(_summary_table(summary))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Usage errors exit 2 (click's convention), as do prospect-mailer's own input and
    configuration errors, which are printed as one clear line instead of a traceback.
    """
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_BAD_INPUT)
    except ProspectMailerError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to resume")
        return 130
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
