"""``prospect-mailer lint CAMPAIGN.toml``: pre-flight checks of a campaign."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..compliance import FooterRenderer
from ..files import load_campaign
from ..lint import LintCheck, check_unsubscribe_endpoint, lint_campaign
from .app import EXIT_BLOCKED, app, console
from .common import echo_json, settings

__all__ = ["lint"]

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


@app.command()
def lint(
    campaign_file: Annotated[Path, typer.Argument(help="campaign TOML file")],
    offline: Annotated[
        bool, typer.Option("--offline", help="skip the unsubscribe endpoint request")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="warnings fail too")] = False,
    timeout: Annotated[float, typer.Option(help="seconds for the endpoint check")] = 5.0,
    json_out: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """Check a campaign before sending: templates render for a sample prospect, both footers
    in every part, advertiser identity and postal address, From domain, purpose declared, and
    the unsubscribe base URL is HTTPS and answers GET /healthz.

    Exit 1 if a check fails (or warns, with --strict).

    Example: prospect-mailer lint examples/campaign.toml --offline
    """
    campaign = load_campaign(campaign_file)
    config = settings()
    checks = lint_campaign(
        campaign, renderer=FooterRenderer(config.template_dirs), base_url=config.base_url
    )
    url_ok = all(c.status != "fail" for c in checks if c.name == "unsubscribe")
    if offline:
        checks.append(LintCheck("unsubscribe", "skipped", "endpoint not requested (--offline)"))
    elif url_ok:
        checks.append(
            asyncio.run(check_unsubscribe_endpoint(config.base_url, request_timeout=timeout))
        )
    failed = [c for c in checks if c.status == "fail" or (strict and c.status == "warn")]
    if json_out:
        echo_json(
            {
                "campaign": campaign.id,
                "ok": not failed,
                "checks": [
                    {"name": c.name, "status": c.status, "message": c.message, "rule_id": c.rule_id}
                    for c in checks
                ],
            }
        )
    else:
        table = Table(title=f"Lint {campaign_file}")
        for col in ("check", "status", "rule", "finding"):
            table.add_column(col)
        for c in checks:
            style = _STYLE[c.status]
            table.add_row(c.name, f"[{style}]{c.status}[/]", c.rule_id, escape(c.message))
        console.print(table)
        console.print("lint: " + (f"{len(failed)} check(s) failed" if failed else "ok"))
    if failed:
        raise typer.Exit(EXIT_BLOCKED)
