"""Lists in and out of the store: prospect files and hashed suppression lists.

Everything streams (constant memory whatever the file size) and validates before it writes:

* :func:`scan_prospects` reads a whole prospects CSV once and reports every bad row by line
  and column; a problem that stops reading (wrong encoding, unknown column, broken quoting)
  raises :class:`~prospect_mailer.errors.DataFileError`. The CLI runs it before a send or an
  import, so a bad file refuses the run before anything is sent or written.
* :func:`import_prospects` registers the good rows, never part of a row, and skips (or, when
  asked, flags and keeps) addresses already on the suppression list in any scope: RULES.md
  SUPP_SURVIVES_DELETION blocks re-imports at import as well as at send.
* :func:`read_key_list` validates a list of hashes, addresses or domains line by line; a
  malformed line raises before anything is imported.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Literal

from .addresses import domain_key, domain_keys_of, lookup_keys, normalise
from .errors import DataFileError, InvalidAddressError, InvalidInputError
from .files import _rows  # the one CSV reader (row-level results, bad rows as values)
from .models import Prospect
from .store import Store, SuppressionHit

__all__ = [
    "EXPORT_COLUMNS",
    "ImportReport",
    "KeyListFormat",
    "ScanResult",
    "SuppressedRow",
    "export_prospects",
    "import_prospects",
    "iter_chunks",
    "prospect_row",
    "read_key_list",
    "scan_prospects",
    "suppression_hits",
]

#: Columns of an exported prospects CSV, in model order (an export imports back as is).
EXPORT_COLUMNS: tuple[str, ...] = tuple(Prospect.model_fields)
KeyListFormat = Literal["hashes", "addresses", "domains"]


@dataclass
class ScanResult:
    """A prospects CSV read once without writing anything.

    Attributes:
        rows: data rows read (good and bad; blank lines are not rows).
        good: rows that validate.
        bad: rows that do not.
        problems: the first bad rows (``DataFileError`` with ``.line`` and ``.column``).
    """

    rows: int = 0
    good: int = 0
    bad: int = 0
    problems: list[DataFileError] = field(default_factory=list)


def scan_prospects(
    path: str | Path, *, encoding: str = "utf-8-sig", max_listed: int = 50
) -> ScanResult:
    """Validate every row of a prospects CSV (streamed), listing up to ``max_listed`` bad rows.

    Raises:
        DataFileError: the file cannot be read at all past some point (missing, wrong
            encoding, unknown or duplicate column, broken CSV quoting), naming the line.
    """
    result = ScanResult()
    for item in _rows(path, encoding=encoding):
        result.rows += 1
        if isinstance(item, DataFileError):
            result.bad += 1
            if len(result.problems) < max_listed:
                result.problems.append(item)
        else:
            result.good += 1
    return result


def suppression_hits(
    addresses: Sequence[str], hits: dict[str, list[SuppressionHit]]
) -> dict[str, list[SuppressionHit]]:
    """Group looked-up hits by address: ``{address: hits on it, its domain or a parent}``."""
    return {
        address: found
        for address, a in zip(addresses, [normalise(x) for x in addresses], strict=True)
        if (found := [h for k in (a.key_hash, *domain_keys_of(a)) for h in hits.get(k, ())])
    }


async def _lookup(store: Store, prospects: Sequence[Prospect]) -> dict[str, list[SuppressionHit]]:
    """``{email: hits}`` for the prospects on the suppression list; one query per chunk."""
    addresses = [p.address for p in prospects]  # normalised once per prospect
    keys, domain_keys = lookup_keys(addresses)
    hits = await store.suppression.lookup(keys)
    if not hits:
        return {}
    return {
        p.email: found
        for p, a in zip(prospects, addresses, strict=True)
        if (found := [h for k in (a.key_hash, *domain_keys[a.domain]) for h in hits.get(k, ())])
    }


@dataclass(frozen=True, slots=True)
class SuppressedRow:
    """A row whose address (or domain) is on the suppression list, in some scope."""

    email: str
    kind: str
    scope: str
    scope_value: str
    reason: str
    since: datetime


@dataclass
class ImportReport:
    """What :func:`import_prospects` did.

    Attributes:
        rows: data rows read; ``imported + bad + suppressed_skipped`` (a repeated address
            counts each time it is imported: the last row wins).
        imported: rows registered.
        bad: rows refused (listed in ``problems``, up to the limit).
        suppressed: rows whose address is on the suppression list (listed in
            ``suppressed_rows``, up to the limit); skipped unless ``include_suppressed``.
        suppressed_skipped: those of them not imported.
    """

    rows: int = 0
    imported: int = 0
    bad: int = 0
    suppressed: int = 0
    suppressed_skipped: int = 0
    problems: list[DataFileError] = field(default_factory=list)
    suppressed_rows: list[SuppressedRow] = field(default_factory=list)


async def import_prospects(
    store: Store,
    path: str | Path,
    *,
    encoding: str = "utf-8-sig",
    include_suppressed: bool = False,
    chunk_size: int = 1000,
    max_listed: int = 50,
) -> ImportReport:
    """Register the good rows of a prospects CSV, checking each against the suppression list.

    Call :func:`scan_prospects` first to refuse unreadable files before writing anything: a
    problem that stops reading midway raises here after earlier chunks were written (an
    import is idempotent: fix the file and run it again).

    Args:
        store: the opened store.
        path: the CSV file.
        encoding: its text encoding (``utf-8-sig`` reads UTF-8 with or without a BOM).
        include_suppressed: register suppressed addresses too (they stay blocked at send).
        chunk_size: rows per suppression lookup and per write.
        max_listed: how many bad and suppressed rows to keep in the report.

    Raises:
        DataFileError: the file cannot be read past some point.
        StoreError: the database failed.
    """
    report = ImportReport()
    chunk: list[Prospect] = []

    async def flush() -> None:
        hits = await _lookup(store, chunk)
        keep = []
        for p in chunk:
            found = hits.get(p.email)
            if found:
                report.suppressed += 1
                if len(report.suppressed_rows) < max_listed:
                    h = found[0]
                    report.suppressed_rows.append(
                        SuppressedRow(
                            p.email, h.kind, h.scope, h.scope_value, h.reason, h.created_at
                        )
                    )
                if not include_suppressed:
                    report.suppressed_skipped += 1
                    continue
            keep.append(p)
        await store.prospects.upsert_many(keep)
        report.imported += len(keep)
        chunk.clear()

    for item in _rows(path, encoding=encoding):
        report.rows += 1
        if isinstance(item, DataFileError):
            report.bad += 1
            if len(report.problems) < max_listed:
                report.problems.append(item)
            continue
        chunk.append(item)
        if len(chunk) >= chunk_size:
            await flush()
    if chunk:
        await flush()
    return report


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def prospect_row(prospect: Prospect) -> list[str]:
    """A prospect as CSV cells in :data:`EXPORT_COLUMNS` order (what the importer reads)."""
    return [_cell(getattr(prospect, c)) for c in EXPORT_COLUMNS]


async def export_prospects(
    store: Store, out: IO[str], *, include_suppressed: bool = False, chunk_size: int = 1000
) -> tuple[int, int]:
    """Write every registered prospect as CSV (comma, UTF-8) to ``out``, streamed.

    Addresses on the suppression list (any scope) are left out unless ``include_suppressed``
    (RULES.md US_CANSPAM_NO_OPTOUT_TRANSFER: an opted-out address is not passed on).

    Returns:
        ``(written, left_out)``.

    Raises:
        StoreError: the database failed.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    written = left_out = 0

    async def flush(batch: list[Prospect]) -> None:
        nonlocal written, left_out
        hits = {} if include_suppressed else await _lookup(store, batch)
        for p in batch:
            if p.email in hits:
                left_out += 1
                continue
            writer.writerow(prospect_row(p))
            written += 1
        batch.clear()

    batch: list[Prospect] = []
    async for _key, prospect in store.prospects.iter_all(chunk_size=chunk_size):
        batch.append(prospect)
        if len(batch) >= chunk_size:
            await flush(batch)
    await flush(batch)
    return written, left_out


def _key_of(text: str, fmt: KeyListFormat) -> str:
    if fmt == "hashes":
        value = text.lower()  # the exchange format is lower case; upper-case hex is the same hash
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(f"not a SHA-256 in hex (64 characters 0-9a-f): {text[:80]!r}")
        return value
    try:
        return normalise(text).key_hash if fmt == "addresses" else domain_key(text)
    except (InvalidAddressError, InvalidInputError) as exc:
        raise ValueError(str(exc)) from exc


def read_key_list(
    path: str | Path, fmt: KeyListFormat, *, encoding: str = "utf-8-sig"
) -> Iterator[str]:
    """Stream the suppression keys of a list file, one entry a line.

    ``hashes``: lower-case hex ``sha256(normalised address)`` as partners exchange them
    (RULES.md SUPP_HASHED_SHARING); ``addresses``: e-mail addresses (hashed here, never
    stored); ``domains``: domain names. Blank lines and lines starting with ``#`` are skipped.
    Iterate it once completely to validate before writing anything.

    Raises:
        DataFileError: unreadable file or a malformed line, naming the line.
    """
    where = str(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DataFileError(f"cannot open list file: {exc.strerror}", path=where) from exc
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode(encoding).strip()
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    f"not valid {encoding} text at byte {exc.start}", path=where, line=number
                ) from exc
            if not text or text.startswith("#"):
                continue
            try:
                yield _key_of(text.removeprefix("\ufeff"), fmt)
            except ValueError as exc:
                raise DataFileError(str(exc), path=where, line=number) from exc


async def iter_chunks(keys: Iterator[str], size: int) -> AsyncIterator[list[str]]:
    """Group a key stream into lists of ``size``."""
    chunk: list[str] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
