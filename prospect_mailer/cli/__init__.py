"""The ``prospect-mailer`` command line (typer + rich).

Each command group lives in its own module and registers itself on the shared :data:`app`;
importing them here is what makes them part of the CLI.
"""

from . import demo, ops  # noqa: F401  (register their commands)
from .app import app, main

__all__ = ["app", "main"]
