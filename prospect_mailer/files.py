"""Loading the files users keep: campaigns (TOML) and prospects (CSV).

Every problem is reported as a :class:`~prospect_mailer.errors.DataFileError` naming the file,
the line and the field. A campaign TOML file::

    id = "spring-2026"
    purpose = "prospecting"            # or "transactional"
    subject = "Nos capteurs connectés"
    from = "Ventes ACME <ventes@acme.example>"
    category = "sensors"
    target_functions = ["CTO", "Head of IT"]
    locale = "fr"
    text_template = "templates/spring.txt.j2"   # relative to this file
    html_template = "templates/spring.html.j2"

    [advertiser]
    id = "acme"
    legal_name = "ACME SAS"
    postal_address = "1 rue de la Paix, 75002 Paris"
    contact = "dpo@acme.example"

A prospects CSV has a header row naming fields of :class:`~prospect_mailer.models.Prospect`;
list fields (``purchased_categories``, ``consent_advertisers``) are separated by ``;`` inside
the cell; an empty cell means *unknown*. Comma or semicolon delimiters are detected.
"""

from __future__ import annotations

import csv
import tomllib
from collections.abc import Iterator
from email.utils import parseaddr
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from .errors import DataFileError
from .models import Campaign, Prospect

__all__ = ["PROSPECT_COLUMNS", "iter_prospects", "load_campaign", "load_prospects"]

#: Columns a prospects CSV may have.
PROSPECT_COLUMNS: frozenset[str] = frozenset(Prospect.model_fields)
_LIST_FIELDS = {"purchased_categories", "consent_advertisers"}
_BOOL_FIELDS = {"optout_offered_at_collection"}
_TRUE = {"true", "yes", "oui", "1", "y", "o"}
_FALSE = {"false", "no", "non", "0", "n"}


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "-"
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return loc, msg + more


def load_campaign(path: str | Path) -> Campaign:
    """Read a campaign TOML file; template paths are relative to the file.

    Raises:
        DataFileError: unreadable file, TOML syntax error, missing or invalid key, missing
            template file. The message names the key.
    """
    p = Path(path)
    where = str(path)
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text("utf-8"))
    except OSError as exc:
        raise DataFileError(f"cannot read campaign file: {exc.strerror}", path=where) from exc
    except UnicodeDecodeError as exc:
        raise DataFileError("campaign file is not UTF-8", path=where) from exc
    except tomllib.TOMLDecodeError as exc:
        raise DataFileError(f"TOML syntax error: {exc}", path=where) from exc
    from_given = "from" in data
    if from_given:
        name, addr = parseaddr(str(data.pop("from")))
        data.setdefault("from_address", addr or "")
        if name:
            data.setdefault("from_name", name)
    for key in ("text_template", "html_template"):
        rel = data.get(key)
        if rel is None:
            continue
        if not isinstance(rel, str) or not rel:
            raise DataFileError("must be a path to a template file", path=where, column=key)
        tpl = (p.parent / rel).resolve()
        try:
            data[key] = tpl.read_text("utf-8")
        except OSError as exc:
            raise DataFileError(
                f"cannot read template {tpl}: {exc.strerror}", path=where, column=key
            ) from exc
    for key in ("target_functions", "analogous_categories", "profiles"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        loc, msg = _first_error(exc)
        if loc in ("from_address", "from_name") and from_given:
            loc = "from"
        raise DataFileError(msg, path=where, column=loc) from exc


def _cell(field: str, value: str) -> Any:
    value = value.strip()
    if value == "":
        return None
    if field in _LIST_FIELDS:
        return tuple(v.strip() for v in value.split(";") if v.strip())
    if field in _BOOL_FIELDS:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"not a yes/no value: {value!r}")
    return value


def iter_prospects(path: str | Path, *, encoding: str = "utf-8-sig") -> Iterator[Prospect]:
    """Stream prospects from a CSV file, one row at a time (constant memory).

    Raises:
        DataFileError: at the first bad row, naming the line and column; rows before it have
            been yielded already. Use :func:`load_prospects` to validate a whole file first.
    """
    for item in _rows(path, encoding=encoding):
        if isinstance(item, DataFileError):
            raise item
        yield item


def load_prospects(
    path: str | Path, *, encoding: str = "utf-8-sig", max_errors: int = 20
) -> list[Prospect]:
    """Read and validate a whole CSV file.

    Raises:
        DataFileError: if any row is bad; the message lists up to ``max_errors`` bad rows by
            line and column, so one pass shows what to fix. Nothing is returned partially.
    """
    good: list[Prospect] = []
    bad: list[DataFileError] = []
    for item in _rows(path, encoding=encoding):
        if isinstance(item, DataFileError):
            if item.line is None:
                raise item
            bad.append(item)
        else:
            good.append(item)
    if bad:
        shown = "\n  ".join(str(e) for e in bad[:max_errors])
        more = f"\n  ... and {len(bad) - max_errors} more" if len(bad) > max_errors else ""
        raise DataFileError(
            f"{len(bad)} bad row(s), nothing loaded:\n  {shown}{more}",
            path=str(path),
            line=bad[0].line,
            column=bad[0].column,
        )
    return good


def _decoded_lines(fh: IO[bytes], encoding: str, where: str, counter: list[int]) -> Iterator[str]:
    """Decode line by line so that a bad byte is reported on its own line."""
    for raw in fh:
        counter[0] += 1
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            hint = " (try --encoding latin-1)" if encoding.startswith("utf") else ""
            raise DataFileError(
                f"not valid {encoding} text at byte {exc.start}{hint}",
                path=where,
                line=counter[0],
            ) from exc
        if counter[0] == 1 and encoding == "utf-8-sig":
            text = text.removeprefix("\ufeff")
        yield text


def _rows(path: str | Path, *, encoding: str) -> Iterator[Prospect | DataFileError]:
    where = str(path)
    try:
        "".encode(encoding)
    except LookupError as exc:
        raise DataFileError(f"unknown text encoding {encoding!r}", path=where) from exc
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise DataFileError(f"cannot open prospects file: {exc.strerror}", path=where) from exc
    with fh:
        counter = [0]  # physical lines read so far
        lines = _decoded_lines(fh, encoding, where, counter)
        header_line = next(lines, "")
        if not header_line.strip():
            raise DataFileError("empty file: a header row is expected", path=where, line=1)
        delimiter = ";" if header_line.count(";") > header_line.count(",") else ","
        header = next(csv.reader([header_line], delimiter=delimiter))
        columns = [h.strip() for h in header]
        unknown = [c for c in columns if c not in PROSPECT_COLUMNS]
        if unknown:
            raise DataFileError(
                f"unknown column(s) {unknown}; known: {sorted(PROSPECT_COLUMNS)}",
                path=where,
                line=1,
            )
        if "email" not in columns:
            raise DataFileError("the header has no 'email' column", path=where, line=1)
        dupes = {c for c in columns if columns.count(c) > 1}
        if dupes:
            raise DataFileError(f"duplicate column(s) {sorted(dupes)}", path=where, line=1)
        reader = csv.reader(lines, delimiter=delimiter)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataFileError(f"CSV syntax: {exc}", path=where, line=counter[0]) from exc
            line = counter[0]  # a quoted cell may span lines: this is the row's last line
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                yield DataFileError(
                    f"{len(row)} cells but the header has {len(columns)}", path=where, line=line
                )
                continue
            data: dict[str, Any] = {}
            try:
                for col, cell in zip(columns, row, strict=True):
                    value = _cell(col, cell)
                    if value is not None:
                        data[col] = value
            except ValueError as exc:
                yield DataFileError(str(exc), path=where, line=line, column=col)
                continue
            try:
                yield Prospect.model_validate(data)
            except ValidationError as exc:
                loc, msg = _first_error(exc)
                yield DataFileError(msg, path=where, line=line, column=loc)
