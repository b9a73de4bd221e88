"""The prospect registry: registered prospects, keyed by the hash of their address.

This table holds personal data by design (it is the prospect file), kept apart from the
suppression list, which must not. The SMTP relay checks it at ``RCPT TO``; purges
(RULES.md FR_PROSPECT_RETENTION_3Y, SUPP_SURVIVES_DELETION) delete from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime

from pydantic import ValidationError
from sqlalchemy import delete, func, select

from ..addresses import normalise_recent
from ..errors import StoreError
from ..models import Prospect
from .engine import Database
from .fastread import SQLiteReader
from .tables import PROSPECTS

__all__ = ["ProspectRegistry"]

_CHUNK = 500


def _load(recipient_hash: str, data: str) -> Prospect:
    try:
        return Prospect.model_validate_json(data)
    except ValidationError as exc:
        raise StoreError(f"stored prospect {recipient_hash[:12]}... is unreadable: {exc}") from exc


class ProspectRegistry:
    """Registered prospects in the store (``store.prospects``)."""

    def __init__(self, db: Database, reader: SQLiteReader | None = None) -> None:
        self._db = db
        self.reader = reader  # SQLite: direct reads (the relay looks up every RCPT)

    async def upsert(self, prospect: Prospect) -> None:
        """Insert ``prospect`` or replace the one registered for the same address.

        Raises:
            StoreError: the database failed.
        """
        await self.upsert_many([prospect])

    async def upsert_many(self, prospects: Iterable[Prospect]) -> int:
        """Insert or replace many prospects (the last one wins for a repeated address).

        Written in statements of 500, each committed on its own (an import is idempotent:
        run it again after a failure).

        Returns:
            The number of distinct prospects written.

        Raises:
            StoreError: the database failed.
        """
        rows: dict[str, str] = {}
        for prospect in prospects:
            rows[prospect.address.key_hash] = prospect.model_dump_json()
        items = list(rows.items())
        for start in range(0, len(items), _CHUNK):
            now = datetime.now(UTC)
            values = [
                {"recipient_hash": key, "data": data, "updated_at": now}
                for key, data in items[start : start + _CHUNK]
            ]
            stmt = self._db.insert(PROSPECTS).values(values)
            stmt = stmt.on_conflict_do_update(
                index_elements=[PROSPECTS.c.recipient_hash],
                set_={"data": stmt.excluded.data, "updated_at": stmt.excluded.updated_at},
            )
            async with self._db.transaction("registering prospects") as conn:
                await conn.execute(stmt)
        return len(items)

    async def get(self, address: str) -> Prospect | None:
        """The prospect registered for ``address`` (any form that normalises the same).

        Raises:
            InvalidAddressError: the address cannot be normalised.
            StoreError: the database failed.
        """
        key = normalise_recent(address).key_hash
        return (await self.get_many([key])).get(key)

    async def get_many(self, recipient_hashes: Sequence[str]) -> dict[str, Prospect]:
        """``{recipient_hash: prospect}`` for the registered ones among ``recipient_hashes``.

        Raises:
            StoreError: the database failed.
        """
        wanted = list(dict.fromkeys(recipient_hashes))
        found: dict[str, Prospect] = {}
        if self.reader is not None and not self._db.closed:
            rows = await self.reader.fetch_in(
                "SELECT recipient_hash, data FROM prospects WHERE recipient_hash IN (?*)",
                [],
                wanted,
            )
            return {key: _load(key, data) for key, data in rows}
        t = PROSPECTS
        async with self._db.connection("reading prospects") as conn:
            for start in range(0, len(wanted), 900):
                stmt = select(t.c.recipient_hash, t.c.data).where(
                    t.c.recipient_hash.in_(wanted[start : start + 900])
                )
                for key, data in await conn.execute(stmt):
                    found[key] = _load(key, data)
        return found

    async def delete(self, recipient_hash: str) -> bool:
        """Delete the prospect registered under ``recipient_hash``.

        Suppression entries are separate and survive (SUPP_SURVIVES_DELETION).

        Returns:
            ``True`` if a prospect was deleted.

        Raises:
            StoreError: the database failed.
        """
        stmt = (
            delete(PROSPECTS)
            .where(PROSPECTS.c.recipient_hash == recipient_hash)
            .returning(PROSPECTS.c.id)
        )
        async with self._db.transaction("deleting a prospect") as conn:
            return (await conn.execute(stmt)).first() is not None

    async def count(self) -> int:
        """Number of registered prospects.

        Raises:
            StoreError: the database failed.
        """
        async with self._db.connection("counting prospects") as conn:
            result = await conn.execute(select(func.count()).select_from(PROSPECTS))
            return int(result.scalar_one())

    async def iter_all(self, *, chunk_size: int = _CHUNK) -> AsyncIterator[tuple[str, Prospect]]:
        """Stream ``(recipient_hash, prospect)`` for every registered prospect.

        Read in chunks by primary key (constant memory, no connection held between chunks);
        prospects deleted while iterating are simply not seen again.

        Raises:
            StoreError: the database failed, or a stored prospect is unreadable.
        """
        t = PROSPECTS
        after = 0
        while True:
            stmt = (
                select(t.c.id, t.c.recipient_hash, t.c.data)
                .where(t.c.id > after)
                .order_by(t.c.id)
                .limit(chunk_size)
            )
            async with self._db.connection("reading prospects") as conn:
                rows = (await conn.execute(stmt)).all()
            for _id, key, data in rows:
                yield key, _load(key, data)
            if len(rows) < chunk_size:
                return
            after = int(rows[-1][0])

    async def delete_many(self, recipient_hashes: Sequence[str]) -> int:
        """Delete the prospects registered under ``recipient_hashes``, in one transaction.

        Suppression entries are separate and survive (SUPP_SURVIVES_DELETION).

        Returns:
            How many prospects were deleted.

        Raises:
            StoreError: the database failed (nothing is deleted).
        """
        wanted = list(dict.fromkeys(recipient_hashes))
        deleted = 0
        async with self._db.transaction("deleting prospects") as conn:
            for start in range(0, len(wanted), 900):
                stmt = delete(PROSPECTS).where(
                    PROSPECTS.c.recipient_hash.in_(wanted[start : start + 900])
                )
                deleted += (await conn.execute(stmt)).rowcount
        return deleted
