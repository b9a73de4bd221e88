"""The shared Typer app, console, exit codes and ``main``; commands live in sibling modules.

``main(argv)`` is what the console script calls; tests call it directly. Exit codes: 0 ok,
1 some recipients blocked/failed or a check failed, 2 bad input or configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ProspectMailerError
from ..mailer import SendSummary
from ..models import Outcome

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BLOCKED",
    "EXIT_OK",
    "app",
    "console",
    "main",
    "outcome_table",
    "summary_table",
]

app = typer.Typer(
    name="prospect-mailer",
    help="Send prospecting email with CNIL/GDPR rules enforced at send time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(highlight=False, stderr=True)

EXIT_OK, EXIT_BLOCKED, EXIT_BAD_INPUT = 0, 1, 2
_STYLE = {
    "sent": "green",
    "blocked": "red",
    "failed": "bold red",
    "deferred": "yellow",
    "duplicate": "cyan",
    "allowed": "green",
}


def outcome_table(outcomes: Sequence[Outcome], title: str) -> Table:
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
        table.add_row(escape(o.email), f"[{style}]{o.status}[/{style}]", escape(why))
    return table


def summary_table(summary: SendSummary) -> Table:
    table = Table(title="Totals")
    table.add_column("status / rule")
    table.add_column("count", justify="right")
    for status, n in sorted(summary.counts.items()):
        table.add_row(status, str(n))
    for rule, n in summary.blocked_by_rule.most_common():
        table.add_row(f"  blocked by {rule}", str(n))
    return table


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
        # User data (file names, "[column]" places) must not be read as rich markup.
        # Errors go to stderr: stdout stays clean for --json and exports.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: run the same command again to resume")
        return 130
    return EXIT_OK
