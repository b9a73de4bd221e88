"""The audit log: append-only, hash-chained records of every send, block and objection.

RULES.md AUDIT_PER_SEND and GDPR_ACCOUNTABILITY_RECORDS: identifiers, never a body or a
plaintext address. Each record's ``hash`` is ``sha256(prev_hash + canonical JSON)`` of all its
other fields (sorted keys, no spaces, UTF-8), the first record chaining to 64 zeros. The
``created_at`` time is stored and hashed as an ISO-8601 string with microseconds, so no database
datetime round trip can change what was hashed.

Concurrency comes from the database: :meth:`AuditLog.append` first *updates* the single row of
``audit_head`` (a row lock on PostgreSQL, the write lock on SQLite, both held until commit),
then reads the head, chains the new records, inserts them and moves the head, in one
transaction. ``seq`` is the primary key, so even a broken lock could not give two records the
same position. Any number of processes may append to one database.

What the chain proves: a record edited, removed, reordered or cut off the end since it was
written. What it cannot prove alone: someone with write access rewriting the whole chain and
its head; publish :meth:`AuditLog.head` somewhere else from time to time to anchor it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, func, insert, select, update

from ..errors import StoreError
from . import fastwrite
from .audit_records import (
    GENESIS_HASH,
    HASHED_FIELDS,
    AuditEvent,
    AuditRecord,
    VerifyResult,
    chain_hash,
    chain_rows,
    iso_utc,
)
from .engine import Database
from .fastwrite import SQLiteWriter
from .tables import AUDIT_EVENTS, AUDIT_HEAD

if TYPE_CHECKING:
    from .audit_writer import AuditWriter

__all__ = ["AuditLog"]

_CHUNK = 1000


class AuditLog:
    """The audit log in the store (``store.audit``)."""

    def __init__(self, db: Database, direct: SQLiteWriter | None = None) -> None:
        self._db = db
        self.direct = direct  # SQLite: direct writes for the per-send hot path (fastwrite)

    async def append(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append ``events`` in order, in one transaction (a grouped commit).

        Returns:
            The stored records, once committed (durable).

        Raises:
            InvalidInputError: an event's details cannot be stored (nothing is written).
            StoreError: the database failed (nothing is written).
        """
        return await self._append_rows([e._row() for e in events])

    async def _append_rows(self, rows: Sequence[dict[str, object]]) -> list[AuditRecord]:
        if not rows:
            return []
        if self.direct is not None and not self._db.closed:
            stored = await self.direct.run(
                "appending to the audit log", lambda con: fastwrite.append_audit(con, rows)
            )
            return [AuditRecord._from_row(r) for r in stored]
        head = AUDIT_HEAD
        async with self._db.transaction("appending to the audit log") as conn:
            # The UPDATE comes first: it takes the lock that serialises appenders (a row lock
            # on PostgreSQL, the database write lock on SQLite) before the head is read.
            locked = await conn.execute(
                update(head)
                .where(head.c.id == 1)
                .values(seq=head.c.seq)
                .returning(head.c.seq, head.c.hash)
            )
            found = locked.first()
            if found is None:
                raise StoreError("appending to the audit log failed: the chain head is missing")
            full = chain_rows(int(found[0]), str(found[1]), rows)
            last = full[-1]
            await conn.execute(insert(AUDIT_EVENTS), full)
            await conn.execute(
                update(head).where(head.c.id == 1).values(seq=last["seq"], hash=last["hash"])
            )
        return [AuditRecord._from_row(r) for r in full]

    def writer(self, *, max_batch: int = 500) -> AuditWriter:
        """A group-commit writer on this log (use as ``async with log.writer() as w``)."""
        from .audit_writer import AuditWriter  # here: audit_writer imports this module

        return AuditWriter(self, max_batch=max_batch)

    async def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record (``(0, GENESIS_HASH)`` when empty).

        Publish it elsewhere now and then: a later :meth:`verify` against a known head proves
        nothing before it was rewritten.
        """
        async with self._db.connection("reading the audit head") as conn:
            row = (await conn.execute(select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash))).first()
        if row is None:
            raise StoreError("reading the audit head failed: the chain head is missing")
        return int(row[0]), str(row[1])

    async def verify(self, *, chunk_size: int = _CHUNK) -> VerifyResult:
        """Check the whole chain, streaming records in ``seq`` order (constant memory).

        Detects an edited record (hash mismatch), a removed record (gap in ``seq``), records
        swapped or re-linked (``prev_hash`` mismatch), a truncated tail (head beyond the last
        record) and records written past the head. Records appended while it runs are left
        for the next run.

        Raises:
            StoreError: the database failed.
        """
        t = AUDIT_EVENTS
        last_seq_q = select(func.max(t.c.seq)).scalar_subquery()
        async with self._db.connection("verifying the audit log") as conn:
            row = (
                await conn.execute(select(AUDIT_HEAD.c.seq, AUDIT_HEAD.c.hash, last_seq_q))
            ).first()
        if row is None:
            return VerifyResult(False, 0, 1, "the chain head row is missing")
        head_seq, head_hash, max_seq = int(row[0]), str(row[1]), row[2]
        expected, prev, count = 1, GENESIS_HASH, 0
        while expected <= head_seq:
            stmt = select(t).where(t.c.seq >= expected, t.c.seq <= head_seq)
            async with self._db.connection("verifying the audit log") as conn:
                batch = (await conn.execute(stmt.order_by(t.c.seq).limit(chunk_size))).mappings()
                rows = batch.all()
            if not rows:
                break
            for r in rows:
                seq = int(r["seq"])
                if seq != expected:
                    return VerifyResult(
                        False, count, expected, f"record {expected} is missing (next is {seq})"
                    )
                if r["prev_hash"] != prev:
                    return VerifyResult(
                        False,
                        count,
                        seq,
                        f"record {seq} does not chain to record {seq - 1} "
                        "(records removed, reordered or altered)",
                    )
                digest = chain_hash(r["prev_hash"], {k: r[k] for k in HASHED_FIELDS})
                if digest != r["hash"]:
                    return VerifyResult(False, count, seq, f"record {seq} was altered")
                prev, expected, count = r["hash"], seq + 1, count + 1
        last = expected - 1
        if last < head_seq:
            return VerifyResult(
                False,
                count,
                last + 1,
                f"the head says {head_seq} records but the log ends at {last} (tail removed)",
            )
        if max_seq is not None and int(max_seq) > head_seq:
            return VerifyResult(
                False, count, head_seq + 1, f"records past the head ({head_seq}) were inserted"
            )
        if prev != head_hash:
            return VerifyResult(
                False, count, max(last, 1), f"record {last} does not match the chain head"
            )
        return VerifyResult(True, count, None, f"{count} records, chain intact")

    def _query(
        self,
        *,
        send_id: str | None,
        campaign_id: str | None,
        recipient_hash: str | None,
        status: str | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Select[Any]:
        t = AUDIT_EVENTS
        stmt = select(t)
        if send_id is not None:
            stmt = stmt.where(t.c.send_id == send_id)
        if campaign_id is not None:
            stmt = stmt.where(t.c.campaign_id == campaign_id)
        if recipient_hash is not None:
            stmt = stmt.where(t.c.recipient_hash == recipient_hash)
        if status is not None:
            stmt = stmt.where(t.c.status == status)
        # Fixed-width UTC ISO strings sort as the times they denote.
        if since is not None:
            stmt = stmt.where(t.c.created_at >= iso_utc(since))
        if until is not None:
            stmt = stmt.where(t.c.created_at < iso_utc(until))
        return stmt

    async def events(
        self,
        *,
        send_id: str | None = None,
        campaign_id: str | None = None,
        recipient_hash: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Records matching every given filter, in ``seq`` order.

        ``since`` is inclusive, ``until`` exclusive; naive datetimes are UTC.

        Raises:
            StoreError: the database failed.
        """
        stmt = self._query(
            send_id=send_id,
            campaign_id=campaign_id,
            recipient_hash=recipient_hash,
            status=status,
            since=since,
            until=until,
        ).order_by(AUDIT_EVENTS.c.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        async with self._db.connection("reading the audit log") as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        return [AuditRecord._from_row(r) for r in rows]

    async def iter_events(
        self,
        *,
        send_id: str | None = None,
        campaign_id: str | None = None,
        recipient_hash: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        chunk_size: int = _CHUNK,
    ) -> AsyncIterator[AuditRecord]:
        """Like :meth:`events` but streamed in chunks (for exports of any size).

        No connection is held between chunks, so a slow consumer blocks nobody.

        Raises:
            StoreError: the database failed.
        """
        base = self._query(
            send_id=send_id,
            campaign_id=campaign_id,
            recipient_hash=recipient_hash,
            status=status,
            since=since,
            until=until,
        )
        after = 0
        while True:
            stmt = base.where(AUDIT_EVENTS.c.seq > after).order_by(AUDIT_EVENTS.c.seq)
            async with self._db.connection("reading the audit log") as conn:
                rows = (await conn.execute(stmt.limit(chunk_size))).mappings().all()
            for r in rows:
                yield AuditRecord._from_row(r)
            if len(rows) < chunk_size:
                return
            after = int(rows[-1]["seq"])

    async def count(self) -> int:
        """Number of records in the log.

        Raises:
            StoreError: the database failed.
        """
        async with self._db.connection("counting audit records") as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(AUDIT_EVENTS))).scalar_one()
            )
