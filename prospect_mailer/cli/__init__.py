"""The ``prospect-mailer`` command line (typer + rich).

Each command group lives in its own module and registers itself on the shared :data:`app`;
importing them here is what makes them part of the CLI.
"""

from . import (  # noqa: F401  (register their commands)
    audit,
    demo,
    evidence,
    lint,
    prospects,
    relay,
    send,
    serve,
    suppress,
)
from .app import app, main

__all__ = ["app", "main"]
