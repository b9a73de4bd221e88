"""``prospect-mailer suppress add|remove|check|import|export``: the suppression list.

A value containing ``@`` is an address, anything else a domain (which also covers its
subdomains). Only hashes are stored (docs/RULES.md FR_SUPPRESSION_LIST_RETAINED). The CLI's default
scope is ``global`` (this install never mails it); ``--scope advertiser --scope-value ID``
narrows it to one controller. Adds and removals are audited; ``remove`` needs ``--reason``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Literal

import typer
from rich.table import Table

from ..addresses import domain_key, domain_keys_for, domain_keys_of, normalise
from ..lists import KeyListFormat, iter_chunks, read_key_list
from ..models import SuppressionReason, SuppressionScope
from ..store import AuditEvent, Store, SuppressionKind
from .app import EXIT_BLOCKED, app, console
from .common import echo_json, err_console, open_store

__all__ = ["suppress_app"]

suppress_app = typer.Typer(help="Manage the suppression list (hashes only).", no_args_is_help=True)
app.add_typer(suppress_app, name="suppress")

Scope = Annotated[SuppressionScope, typer.Option(help="global, advertiser or campaign")]
ScopeValue = Annotated[str, typer.Option(help="the advertiser or campaign id (not for global)")]


def _key(value: str) -> tuple[SuppressionKind, str, str | None]:
    """``(kind, key hash, masked address or None)``; raises InvalidInputError (exit 2)."""
    if "@" in value:
        a = normalise(value)
        return "address", a.key_hash, a.masked
    return "domain", domain_key(value), None


async def _audit(
    store: Store,
    kind: SuppressionKind,
    key: str,
    masked: str | None,
    status: str,
    **details: object,
) -> None:
    await store.audit.append(
        [
            AuditEvent(
                kind="suppression",
                status=status,
                recipient_hash=key if kind == "address" else None,
                recipient_masked=masked,
                transport="cli",
                details={"kind": kind, "key_hash": key, **details},
            )
        ]
    )


@suppress_app.command("add")
def suppress_add(
    values: Annotated[list[str], typer.Argument(help="addresses and/or domains")],
    scope: Scope = "global",
    scope_value: ScopeValue = "",
    reason: Annotated[SuppressionReason, typer.Option(help="why")] = "manual",
) -> None:
    """Suppress addresses or whole domains (audited; idempotent).

    Example: prospect-mailer suppress add jean.dupont@example.fr rival.example --scope global
    """
    keys = [(v, *_key(v)) for v in values]  # every value checked before anything is written

    async def run() -> list[tuple[str, bool]]:
        done = []
        async with open_store() as store:
            for value, kind, key, masked in keys:
                add = store.suppression.add_hashes
                new = await add(
                    [key],
                    kind=kind,
                    scope=scope,
                    scope_value=scope_value,
                    reason=reason,
                    source="cli",
                )
                await _audit(
                    store, kind, key, masked, "added" if new else "repeated",
                    scope=scope, scope_value=scope_value, reason=reason,
                    effective_at=datetime.now(UTC),
                )  # fmt: skip
                done.append((value, bool(new)))
        return done

    for value, new in asyncio.run(run()):
        state = "added" if new else "already there"
        console.print(
            f"{value}: {state} ({scope}{' ' + scope_value if scope_value else ''})", markup=False
        )


@suppress_app.command("remove")
def suppress_remove(
    value: Annotated[str, typer.Argument(help="an address or a domain")],
    reason: Annotated[str, typer.Option(help="why the objection is withdrawn (audited)")],
    scope: Annotated[SuppressionScope | None, typer.Option(help="only this scope")] = None,
    scope_value: Annotated[str | None, typer.Option(help="only this scope value")] = None,
) -> None:
    """Remove suppression entries (exceptional: a mistaken entry). Audited with the reason.

    Exit 1 if there was nothing to remove.

    Example: prospect-mailer suppress remove jean.dupont@example.fr --reason "typo, ticket 4411"
    """
    if not reason.strip():
        raise typer.BadParameter("must say why", param_hint="--reason")
    kind, key, masked = _key(value)

    async def run() -> int:
        async with open_store() as store:
            n = await store.suppression.remove(key, kind=kind, scope=scope, scope_value=scope_value)
            if n:
                await _audit(
                    store, kind, key, masked, "removed",
                    scope=scope or "any", scope_value=scope_value, removed=n,
                    removal_reason=reason.strip(),
                )  # fmt: skip
            return n

    n = asyncio.run(run())
    console.print(f"{value}: {n} entr{'y' if n == 1 else 'ies'} removed", markup=False)
    if not n:
        raise typer.Exit(EXIT_BLOCKED)


@suppress_app.command("check")
def suppress_check(
    values: Annotated[list[str], typer.Argument(help="addresses (or domains) to check")],
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Say whether each address (or domain) is suppressed, in which scope and since when.

    Exit 1 if any is suppressed, 0 if none is.

    Example: prospect-mailer suppress check jean.dupont@example.fr
    """
    wanted: list[tuple[str, list[str]]] = []
    for v in values:
        if "@" in v:
            a = normalise(v)
            wanted.append((v, [a.key_hash, *domain_keys_of(a)]))
        else:
            wanted.append((v, domain_keys_for(v)))

    async def run() -> dict[str, list[dict[str, str]]]:
        async with open_store() as store:
            hits = await store.suppression.lookup(sorted({k for _, ks in wanted for k in ks}))
        return {
            v: [
                {
                    "kind": h.kind,
                    "scope": h.scope,
                    "scope_value": h.scope_value,
                    "reason": h.reason,
                    "source": h.source,
                    "since": h.created_at.isoformat(),
                }
                for k in ks
                for h in hits.get(k, ())
            ]
            for v, ks in wanted
        }

    result = asyncio.run(run())
    if json_out:
        echo_json({v: {"suppressed": bool(h), "entries": h} for v, h in result.items()})
    else:
        table = Table(title="Suppression check")
        for col in ("value", "suppressed", "entries"):
            table.add_column(col)
        for v, entries in result.items():
            text = "; ".join(
                f"{e['kind']} {e['scope']} {e['scope_value']} ({e['reason']}, {e['since'][:10]})"
                for e in entries
            )
            table.add_row(v, "yes" if entries else "no", text or "-")
        console.print(table)
    if any(result.values()):
        raise typer.Exit(EXIT_BLOCKED)


@suppress_app.command("import")
def suppress_import(
    file: Annotated[Path, typer.Argument(help="one entry a line; '#' comments and blanks skipped")],
    fmt: Annotated[
        KeyListFormat, typer.Option("--format", help="hashes (sha256 hex), addresses or domains")
    ] = "hashes",
    scope: Scope = "global",
    scope_value: ScopeValue = "",
    reason: Annotated[SuppressionReason, typer.Option(help="why")] = "import",
    encoding: Annotated[str, typer.Option(help="text encoding")] = "utf-8-sig",
    kind_of_hashes: Annotated[
        SuppressionKind | None,
        typer.Option(
            "--kind",
            help="hashes only: address keys (the default) or domain keys, as `suppress export "
            "--kind domain` writes them",
        ),
    ] = None,
) -> None:
    """Import a list: hashed (lower-case hex SHA-256 of the normalised address, as partners
    exchange them; of ``@`` and the domain with ``--kind domain``), addresses, or domains.

    The whole file is checked first: a malformed line stops the import (exit 2, naming the
    line) and nothing is imported.

    Example: prospect-mailer suppress import partner-optouts.sha256 --format hashes --scope global
    """
    implied: SuppressionKind | None = None
    if fmt != "hashes":
        implied = "domain" if fmt == "domains" else "address"
    if implied is not None and kind_of_hashes not in (None, implied):
        raise typer.BadParameter(
            f"--format {fmt} holds {implied} entries; --kind is for --format hashes",
            param_hint="--kind",
        )
    kind: SuppressionKind = implied or kind_of_hashes or "address"
    total = sum(1 for _ in read_key_list(file, fmt, encoding=encoding))  # validation pass
    source = "import:" + file.name.replace("@", "_")[:150]

    async def run() -> int:
        added = 0
        async with open_store() as store:
            async for chunk in iter_chunks(read_key_list(file, fmt, encoding=encoding), 5000):
                added += await store.suppression.add_hashes(
                    chunk, kind=kind, scope=scope, scope_value=scope_value, reason=reason,
                    source=source,
                )  # fmt: skip
            await store.audit.append(
                [
                    AuditEvent(
                        kind="suppression",
                        status="imported",
                        transport="cli",
                        details={
                            "file": file.name,
                            "format": fmt,
                            "lines": total,
                            "added": added,
                            "scope": scope,
                            "scope_value": scope_value,
                            "reason": reason,
                        },
                    )
                ]
            )
        return added

    added = asyncio.run(run())
    console.print(
        f"{file}: {total} entries read, {added} new, {total - added} already there", markup=False
    )


@suppress_app.command("export")
def suppress_export(
    fmt: Annotated[
        Literal["hashes", "jsonl"], typer.Option("--format", help="hashes (one a line) or jsonl")
    ] = "hashes",
    kind: Annotated[SuppressionKind, typer.Option(help="address or domain entries")] = "address",
    scope: Annotated[SuppressionScope | None, typer.Option(help="only this scope")] = None,
    scope_value: Annotated[str | None, typer.Option(help="only this scope value")] = None,
    output: Annotated[Path | None, typer.Option(help="file to write (default stdout)")] = None,
) -> None:
    """Export the list as hashes (the exchange format, one entry a line) or JSON lines.

    A key suppressed in several scopes appears once per entry: filter with --scope.

    For compliance only (docs/RULES.md SUPP_HASHED_SHARING, US_CANSPAM_NO_OPTOUT_TRANSFER): share
    it under contract, for suppression, never for mailing.

    Example: prospect-mailer suppress export --scope global --output optouts.sha256
    """

    async def run(out: IO[str]) -> int:
        n = 0
        async with open_store() as store:
            async for h in store.suppression.iter_entries(
                kind=kind, scope=scope, scope_value=scope_value
            ):
                if fmt == "hashes":
                    out.write(h.key_hash + "\n")
                else:
                    row = {
                        "kind": h.kind,
                        "key_hash": h.key_hash,
                        "scope": h.scope,
                        "scope_value": h.scope_value,
                        "reason": h.reason,
                        "source": h.source,
                        "created_at": h.created_at.isoformat(),
                    }
                    out.write(json.dumps(row) + "\n")
                n += 1
        return n

    if output is None:
        n = asyncio.run(run(sys.stdout))
    else:
        with output.open("w", encoding="utf-8") as fh:
            n = asyncio.run(run(fh))
    err_console.print(
        f"{n} entr{'y' if n == 1 else 'ies'} exported (for suppression only)", markup=False
    )
