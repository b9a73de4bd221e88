"""``prospect-mailer evidence ADDRESS``: the evidence pack for one person."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..evidence import EvidenceFormat, EvidencePack, build_evidence, render_evidence
from .app import EXIT_BLOCKED, app
from .common import err_console, open_store

__all__ = ["evidence"]


@app.command()
def evidence(
    address: Annotated[str, typer.Argument(help="the person's e-mail address")],
    fmt: Annotated[
        EvidenceFormat, typer.Option("--format", help="markdown, json or html (self-contained)")
    ] = "markdown",
    output: Annotated[Path | None, typer.Option(help="file to write (default stdout)")] = None,
) -> None:
    """The evidence pack a DPO hands a regulator or the person: where the data came from,
    legal basis and consent reference, every send and block with dates and rule ids, the
    objection and when it took effect, and whether anything was sent after it.

    Exit 1 if something covered by an objection was sent after it, or the audit chain is
    broken.

    Example: prospect-mailer evidence jean.dupont@example.fr --format html --output jean.html
    """

    async def run() -> EvidencePack:
        async with open_store() as store:
            return await build_evidence(store, address)

    pack = asyncio.run(run())
    text = render_evidence(pack, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, "utf-8")
        err_console.print(f"evidence pack written to {output}", markup=False)
    if not pack.clean:
        raise typer.Exit(EXIT_BLOCKED)
