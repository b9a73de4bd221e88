"""The suppression list ("liste repoussoir"): objections, bounces and complaints, hashed.

RULES.md FR_SUPPRESSION_LIST_RETAINED and CNIL MED-2023-040: keep only what honours an
objection over time: a SHA-256 key (never the address), the scope, the reason, the channel it
came from and when. Writes carrying anything else are refused: ``source`` and ``scope_value``
may not contain ``@``, so an address cannot slip in through them.

Keys: an address entry is keyed by :attr:`NormalisedAddress.key_hash`, a domain entry by
:func:`~prospect_mailer.addresses.domain_key` (``sha256("@" + A-label)``), so both live in one
hashed namespace and one ``lookup`` answers for an address and all its domain keys at once.

Every write is idempotent (``INSERT ... ON CONFLICT DO NOTHING`` on the unique
``(kind, key_hash, scope, scope_value)``), so concurrent unsubscribes from several processes
simply converge. Scope filtering is the policy's job: :meth:`SuppressionList.lookup` returns
every hit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Literal, NamedTuple, cast, get_args

from sqlalchemy import ColumnElement, delete, func, literal_column, select

from ..addresses import domain_key, normalise
from ..errors import InvalidInputError
from ..models import SuppressionReason, SuppressionScope
from .engine import Database
from .fastread import SQLiteReader
from .tables import SUPPRESSION, SUPPRESSION_PREFIX_SQL, suppression_prefixes

__all__ = [
    "SUPPRESSION_KINDS",
    "SUPPRESSION_REASONS",
    "SUPPRESSION_SCOPES",
    "SuppressionHit",
    "SuppressionKind",
    "SuppressionList",
    "check_hash",
]

SuppressionKind = Literal["address", "domain"]
SUPPRESSION_KINDS: tuple[str, ...] = get_args(SuppressionKind)
SUPPRESSION_SCOPES: tuple[str, ...] = get_args(SuppressionScope)
SUPPRESSION_REASONS: tuple[str, ...] = get_args(SuppressionReason)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FREE_TEXT = re.compile(r"[^\x00-\x1f\x7f@]{1,200}")
_INSERT_CHUNK = 500  # rows per INSERT statement (7 parameters each)
_LOOKUP_CHUNK = 900  # keys per IN (...) list


def check_hash(value: object, *, what: str = "key hash") -> str:
    """Return ``value`` if it is a lower-case hex SHA-256 (64 characters).

    Raises:
        InvalidInputError: naming the bad value (a hash is not secret; it is already hashed).
    """
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidInputError(
            f"{what} must be 64 lower-case hex characters (SHA-256), got {value!r:.80}"
        )
    return value


class SuppressionHit(NamedTuple):
    """One suppression entry matching a looked-up key (immutable).

    A named tuple rather than a frozen dataclass: a ``send_many`` chunk against a large list
    builds hundreds at a time, and a frozen dataclass costs four times as much to create.

    Attributes:
        kind: ``address`` or ``domain``.
        key_hash: the key that matched.
        scope: ``global``, ``advertiser`` or ``campaign``.
        scope_value: ``""`` for global, else the advertiser id or campaign id/topic.
        reason: why the entry exists (unsubscribe, complaint, hard_bounce, manual, import).
        source: the channel it came from (``web``, ``one-click``, ``mailto``, ``cli``...).
        created_at: when the objection was recorded (UTC).
    """

    kind: SuppressionKind
    key_hash: str
    scope: SuppressionScope
    scope_value: str
    reason: SuppressionReason
    source: str
    created_at: datetime


def _check_entry(kind: str, scope: str, scope_value: str, reason: str, source: str) -> None:
    if kind not in SUPPRESSION_KINDS:
        raise InvalidInputError(
            f"suppression kind must be one of {SUPPRESSION_KINDS}, not {kind!r}"
        )
    if scope not in SUPPRESSION_SCOPES:
        raise InvalidInputError(
            f"suppression scope must be one of {SUPPRESSION_SCOPES}, not {scope!r}"
        )
    if scope == "global":
        if scope_value != "":
            raise InvalidInputError(
                f"a global suppression takes scope_value '', not {scope_value!r}"
            )
    elif not isinstance(scope_value, str) or not _FREE_TEXT.fullmatch(scope_value):
        raise InvalidInputError(
            f"scope {scope!r} needs a scope_value (the {scope} id, --scope-value in the CLI: "
            "1-200 characters, "
            f"no '@' or control character), got {scope_value!r:.80}"
        )
    if reason not in SUPPRESSION_REASONS:
        raise InvalidInputError(
            f"suppression reason must be one of {SUPPRESSION_REASONS}, not {reason!r}"
        )
    if not isinstance(source, str) or not _FREE_TEXT.fullmatch(source):
        raise InvalidInputError(
            "suppression source must be 1-200 characters without '@' or control characters "
            f"(it names a channel, never a person), got {source!r:.80}"
        )


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class SuppressionList:
    """Suppression entries in the store (``store.suppression``)."""

    def __init__(self, db: Database, reader: SQLiteReader | None = None) -> None:
        self._db = db
        #: SQLite only: a direct read-only connection for the lookup hot path.
        self.reader = reader

    async def add_address(
        self,
        address: str,
        *,
        scope: SuppressionScope = "advertiser",
        scope_value: str,
        reason: SuppressionReason,
        source: str,
        created_at: datetime | None = None,
    ) -> bool:
        """Suppress ``address`` (stored as its key hash only).

        Args:
            address: the address, in any form :func:`~prospect_mailer.addresses.normalise`
                accepts.
            scope: ``advertiser`` (default: an objection to this controller's prospecting),
                ``global`` (this install never mails it) or ``campaign`` (a preference).
            scope_value: ``""`` for global, else the advertiser or campaign id.
            reason: unsubscribe, complaint, hard_bounce, manual or import.
            source: the channel (``web``, ``one-click``, ``mailto``, ``cli``, ``import:x.csv``).
            created_at: when the objection was made, if not now (imports keep its date).

        Returns:
            ``True`` if the entry is new, ``False`` if it already existed (idempotent).

        Raises:
            InvalidAddressError: the address cannot be normalised.
            InvalidInputError: bad scope, scope_value, reason or source.
            StoreError: the database failed.
        """
        key = normalise(address).key_hash
        return await self._add_one("address", key, scope, scope_value, reason, source, created_at)

    async def add_domain(
        self,
        domain: str,
        *,
        scope: SuppressionScope = "advertiser",
        scope_value: str,
        reason: SuppressionReason,
        source: str,
        created_at: datetime | None = None,
    ) -> bool:
        """Suppress a whole domain (``example.com`` also covers its subdomains at lookup).

        Same arguments, return value and errors as :meth:`add_address`; the domain must be a
        valid IDNA2008 name.
        """
        key = domain_key(domain)
        return await self._add_one("domain", key, scope, scope_value, reason, source, created_at)

    async def _add_one(
        self,
        kind: SuppressionKind,
        key: str,
        scope: str,
        scope_value: str,
        reason: str,
        source: str,
        created_at: datetime | None,
    ) -> bool:
        _check_entry(kind, scope, scope_value, reason, source)
        row = {
            "kind": kind,
            "key_hash": key,
            "scope": scope,
            "scope_value": scope_value,
            "reason": reason,
            "source": source,
            "created_at": _utc(created_at),
        }
        stmt = (
            self._db.insert(SUPPRESSION)
            .values(row)
            .on_conflict_do_nothing()
            .returning(SUPPRESSION.c.id)
        )
        async with self._db.transaction("adding a suppression entry") as conn:
            result = await conn.execute(stmt)
            return result.first() is not None

    async def add_hashes(
        self,
        hashes: Iterable[str],
        *,
        kind: SuppressionKind,
        scope: SuppressionScope,
        scope_value: str,
        reason: SuppressionReason,
        source: str,
        created_at: datetime | None = None,
    ) -> int:
        """Add many precomputed keys (a hashed suppression feed, an import).

        Each hash is checked first (64 lower-case hex); nothing is written if one is bad.
        Rows go in statements of 500, each committed on its own so a long import does not
        hold the write lock for its whole length; being idempotent, a failed import is
        simply run again.

        Returns:
            How many entries were new.

        Raises:
            InvalidInputError: a hash is malformed (named in the message), or a bad scope,
                scope_value, kind, reason or source.
            StoreError: the database failed.
        """
        _check_entry(kind, scope, scope_value, reason, source)
        keys = list(dict.fromkeys(check_hash(h) for h in hashes))
        when = _utc(created_at)
        added = 0
        for start in range(0, len(keys), _INSERT_CHUNK):
            rows = [
                {
                    "kind": kind,
                    "key_hash": key,
                    "scope": scope,
                    "scope_value": scope_value,
                    "reason": reason,
                    "source": source,
                    "created_at": when,
                }
                for key in keys[start : start + _INSERT_CHUNK]
            ]
            stmt = (
                self._db.insert(SUPPRESSION)
                .values(rows)
                .on_conflict_do_nothing()
                .returning(SUPPRESSION.c.id)
            )
            async with self._db.transaction("adding suppression entries") as conn:
                added += len((await conn.execute(stmt)).all())
        return added

    async def remove(
        self,
        key_hash: str,
        *,
        kind: SuppressionKind,
        scope: SuppressionScope | None = None,
        scope_value: str | None = None,
    ) -> int:
        """Delete entries for ``key_hash`` (all scopes, or one scope, or one scope value).

        Removing an objection is exceptional (a mistaken manual entry): the caller should
        audit it.

        Returns:
            The number of entries deleted.

        Raises:
            InvalidInputError: malformed hash, or unknown kind or scope.
            StoreError: the database failed.
        """
        check_hash(key_hash)
        if kind not in SUPPRESSION_KINDS:
            raise InvalidInputError(f"suppression kind must be one of {SUPPRESSION_KINDS}")
        stmt = delete(SUPPRESSION).where(
            SUPPRESSION.c.kind == kind, SUPPRESSION.c.key_hash == key_hash
        )
        if scope is not None:
            if scope not in SUPPRESSION_SCOPES:
                raise InvalidInputError(f"suppression scope must be one of {SUPPRESSION_SCOPES}")
            stmt = stmt.where(SUPPRESSION.c.scope == scope)
        if scope_value is not None:
            stmt = stmt.where(SUPPRESSION.c.scope_value == scope_value)
        async with self._db.transaction("removing suppression entries") as conn:
            return (await conn.execute(stmt)).rowcount

    async def lookup(self, keys: Sequence[str]) -> dict[str, list[SuppressionHit]]:
        """Every entry for any of ``keys`` (address keys and domain keys mixed).

        Indexed queries on the keys' first 16 hex digits (``ix_suppression_prefix``), at most
        900 a statement, whose rows are kept for the keys asked only: one statement for a few
        keys; on SQLite a large batch is split in parts read in parallel (see
        :mod:`~prospect_mailer.store.fastread`). No scope filtering: the policy decides which
        hits apply to a send.

        Returns:
            ``{key: [hits]}`` for the keys that have at least one entry; keys without an entry
            are absent.

        Raises:
            StoreError: the database failed (the caller must fail closed: send nothing).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, list[SuppressionHit]] = {}
        if not wanted:
            return found
        if self.reader is not None and not self._db.closed:
            times: dict[str, datetime] = {}  # one parse per distinct timestamp
            # The reader keeps only the rows of the keys asked.
            for kind, key, scope, value, reason, source, created in await self.reader.lookup(
                wanted
            ):
                at = times.get(created)
                if at is None:
                    at = times[created] = _utc(datetime.fromisoformat(created))
                found.setdefault(key, []).append(
                    SuppressionHit(kind, key, scope, value, reason, source, at)
                )
            return found
        t = SUPPRESSION
        columns = (t.c.kind, t.c.key_hash, t.c.scope, t.c.scope_value, t.c.reason, t.c.source)
        # Spelt as the index spells it (a bound 1 or 16 would not match the index).
        prefix: ColumnElement[str] = literal_column(SUPPRESSION_PREFIX_SQL)
        prefixes = suppression_prefixes(wanted)
        asked = set(wanted)
        async with self._db.connection("suppression lookup") as conn:
            for start in range(0, len(prefixes), _LOOKUP_CHUNK):
                chunk = prefixes[start : start + _LOOKUP_CHUNK]
                result = await conn.execute(
                    select(*columns, t.c.created_at).where(prefix.in_(chunk))
                )
                for kind, key, scope, value, reason, source, created in result:
                    if key not in asked:
                        continue  # another key with the same first 16 digits
                    hit = SuppressionHit(
                        kind=cast(SuppressionKind, kind),
                        key_hash=key,
                        scope=cast(SuppressionScope, scope),
                        scope_value=value,
                        reason=cast(SuppressionReason, reason),
                        source=source,
                        created_at=_utc(created),
                    )
                    found.setdefault(key, []).append(hit)
        return found

    async def prepare(self) -> bool:
        """Load the lookup's key filter saved in the database, or build it, now, and wait for
        it (SQLite file only; otherwise the first large lookup starts that, in a thread, the
        lookups going to SQLite until it is ready: 0.03-0.1 s to load for 10,000,000 entries,
        11-23 s to build, once per database). A service or a send loop may call it at start,
        a benchmark before measuring.

        Returns:
            ``True`` if lookups now screen keys with the filter; ``False`` on PostgreSQL, or
            if it could not be built (logged; lookups go to the database, as always right).
        """
        if self.reader is None or self._db.closed:
            return False
        return await self.reader.prepare() is not None

    async def count(
        self, *, kind: SuppressionKind | None = None, scope: SuppressionScope | None = None
    ) -> int:
        """Number of entries, optionally of one kind and/or one scope.

        Raises:
            StoreError: the database failed.
        """
        stmt = select(func.count()).select_from(SUPPRESSION)
        if kind is not None:
            stmt = stmt.where(SUPPRESSION.c.kind == kind)
        if scope is not None:
            stmt = stmt.where(SUPPRESSION.c.scope == scope)
        async with self._db.connection("counting suppression entries") as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def iter_entries(
        self,
        *,
        kind: SuppressionKind | None = None,
        scope: SuppressionScope | None = None,
        scope_value: str | None = None,
        chunk_size: int = 1000,
    ) -> AsyncIterator[SuppressionHit]:
        """Stream every entry (optionally of one kind, scope, scope value) in insertion order.

        For exports of any size: read in chunks by primary key, no connection held between
        chunks.

        Raises:
            StoreError: the database failed.
        """
        t = SUPPRESSION
        base = select(
            t.c.id, t.c.kind, t.c.key_hash, t.c.scope, t.c.scope_value, t.c.reason,
            t.c.source, t.c.created_at,
        )  # fmt: skip
        if kind is not None:
            base = base.where(t.c.kind == kind)
        if scope is not None:
            base = base.where(t.c.scope == scope)
        if scope_value is not None:
            base = base.where(t.c.scope_value == scope_value)
        after = 0
        while True:
            stmt = base.where(t.c.id > after).order_by(t.c.id).limit(chunk_size)
            async with self._db.connection("exporting the suppression list") as conn:
                rows = (await conn.execute(stmt)).all()
            for _id, k, key, sc, value, reason, source, created in rows:
                yield SuppressionHit(
                    kind=cast(SuppressionKind, k),
                    key_hash=key,
                    scope=cast(SuppressionScope, sc),
                    scope_value=value,
                    reason=cast(SuppressionReason, reason),
                    source=source,
                    created_at=_utc(created),
                )
            if len(rows) < chunk_size:
                return
            after = int(rows[-1][0])
