"""Send claims: the idempotency key ``(campaign_id, step, recipient_hash, message_key)``.

``message_key`` is ``""`` for library sends (DESIGN.md: a campaign step goes to a recipient
once) and the Message-ID for the relay (a client's retry of the same message is a duplicate).

A send is *claimed* (``pending``) durably before the message is handed to the transport, then
*finished* (``sent``, ``failed``, ``deferred`` or ``blocked``). A crash in between leaves
``pending``: honest, and a resume does not send twice. Retrying takes over a ``failed`` or
``deferred`` claim; ``force=True`` takes over any claim.

Exactly one of any number of concurrent claimers wins, in one process or many: the unique
constraint decides who inserts the row, and a take-over is an ``UPDATE ... WHERE send_id = <the
one seen> AND status = <the one seen>`` whose returned row decides who took it. No in-process
lock is involved.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast, get_args

from sqlalchemy import ColumnElement, and_, select, update

from ..errors import InvalidInputError
from . import fastwrite
from .engine import Database
from .fastread import SQLiteReader
from .fastwrite import SQLiteWriter
from .pickling import plain_pickle
from .suppression import check_hash
from .tables import AUDIT_EVENTS, SEND_CLAIMS

__all__ = [
    "CLAIM_STATUSES",
    "ClaimRecord",
    "ClaimRequest",
    "ClaimResult",
    "ClaimStatus",
    "FinishRequest",
    "SendClaims",
    "check_claim_requests",
    "check_finish_requests",
]

ClaimStatus = Literal["pending", "sent", "failed", "deferred", "blocked"]
CLAIM_STATUSES: tuple[str, ...] = get_args(ClaimStatus)
_RETRYABLE = frozenset({"failed", "deferred"})
_ID = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
_CHUNK = 900


@plain_pickle
@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Outcome of :meth:`SendClaims.claim`.

    Attributes:
        claimed: this caller now owns the send and may hand the message to the transport.
        existing_status: the claim's status before this call (``None`` if there was none).
            When ``claimed`` is false, it is why: ``pending`` or ``sent`` (a duplicate),
            ``blocked``, or a retryable status another claimer took first.
        existing_send_id: the send id holding (or that held) the claim.
        existing_message_id: its Message-ID, if it was recorded.
        taken_over: ``claimed`` by taking over an existing claim (a retry or ``force``).
    """

    claimed: bool
    existing_status: ClaimStatus | None = None
    existing_send_id: str | None = None
    existing_message_id: str | None = None
    taken_over: bool = False


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """A stored claim, as found by :meth:`SendClaims.by_send_id`."""

    campaign_id: str
    step: int
    recipient_hash: str
    message_key: str
    advertiser_id: str
    status: ClaimStatus
    send_id: str
    message_id: str | None


@plain_pickle
@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One send to claim in :meth:`SendClaims.claim_many`."""

    campaign_id: str
    step: int
    recipient_hash: str
    advertiser_id: str
    send_id: str
    message_key: str = ""


@plain_pickle
@dataclass(frozen=True, slots=True)
class FinishRequest:
    """One claim to finish in :meth:`SendClaims.finish_many`."""

    campaign_id: str
    step: int
    recipient_hash: str
    send_id: str
    status: ClaimStatus
    message_id: str | None = None
    message_key: str = ""


def _check_message_key(message_key: str) -> None:
    if (
        not isinstance(message_key, str)
        or len(message_key) > 255
        or any(c in message_key for c in "\r\n\x00")
    ):
        raise InvalidInputError(f"message_key must be at most 255 characters: {message_key!r:.80}")


def _check_key(campaign_id: str, step: int, recipient_hash: str) -> None:
    if not isinstance(campaign_id, str) or not _ID.fullmatch(campaign_id):
        raise InvalidInputError(f"campaign_id must be 1-128 printable characters: {campaign_id!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise InvalidInputError(f"step must be a positive integer, not {step!r}")
    check_hash(recipient_hash, what="recipient_hash")


def check_claim_requests(requests: Sequence[ClaimRequest]) -> None:
    """Refuse a malformed key or id (before anything is written).

    Raises:
        InvalidInputError: naming the first bad request.
    """
    for r in requests:
        _check_key(r.campaign_id, r.step, r.recipient_hash)
        _check_message_key(r.message_key)
        _check_id("advertiser_id", r.advertiser_id)
        _check_id("send_id", r.send_id)


def check_finish_requests(requests: Sequence[FinishRequest]) -> None:
    """Refuse a malformed key or an unknown status (before anything is written).

    Raises:
        InvalidInputError: naming the first bad request.
    """
    for r in requests:
        _check_key(r.campaign_id, r.step, r.recipient_hash)
        if r.status not in CLAIM_STATUSES:
            raise InvalidInputError(f"claim status must be one of {CLAIM_STATUSES}: {r.status!r}")


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value) or len(value) > 64:
        raise InvalidInputError(f"{name} must be 1-64 printable characters: {value!r:.80}")


class SendClaims:
    """The send claims in the store (``store.claims``)."""

    def __init__(
        self, db: Database, reader: SQLiteReader | None = None, direct: SQLiteWriter | None = None
    ) -> None:
        self._db = db
        self.reader = reader  # SQLite: direct reads for the per-send hot path
        self.direct = direct  # SQLite: direct writes for the per-send hot path (fastwrite)

    @staticmethod
    def _key(
        campaign_id: str, step: int, recipient_hash: str, message_key: str
    ) -> ColumnElement[bool]:
        t = SEND_CLAIMS
        return and_(
            t.c.campaign_id == campaign_id,
            t.c.step == step,
            t.c.recipient_hash == recipient_hash,
            t.c.message_key == message_key,
        )

    async def claim(
        self,
        *,
        campaign_id: str,
        step: int,
        recipient_hash: str,
        advertiser_id: str,
        send_id: str,
        force: bool = False,
        message_key: str = "",
    ) -> ClaimResult:
        """Atomically claim the send of ``(campaign_id, step, recipient_hash)`` for ``send_id``.

        Inserts a ``pending`` claim; if one exists, takes it over when its status is
        ``failed`` or ``deferred`` (or any status with ``force=True``), else reports it.

        Raises:
            InvalidInputError: a malformed key or id.
            StoreError: the database failed (the caller must not send).
        """
        _check_key(campaign_id, step, recipient_hash)
        _check_message_key(message_key)
        _check_id("advertiser_id", advertiser_id)
        _check_id("send_id", send_id)
        t = SEND_CLAIMS
        now = datetime.now(UTC)
        key = self._key(campaign_id, step, recipient_hash, message_key)
        current = select(t.c.status, t.c.send_id, t.c.message_id).where(key)
        async with self._db.transaction("claiming a send") as conn:
            # A write first: on SQLite it takes the write lock, so the read below is current.
            inserted = await conn.execute(
                self._db.insert(t)
                .values(
                    campaign_id=campaign_id,
                    step=step,
                    recipient_hash=recipient_hash,
                    message_key=message_key,
                    advertiser_id=advertiser_id,
                    status="pending",
                    send_id=send_id,
                    message_id=None,
                    updated_at=now,
                )
                .on_conflict_do_nothing()
                .returning(t.c.id)
            )
            if inserted.first() is not None:
                return ClaimResult(claimed=True)
            seen = (await conn.execute(current)).first()
            if seen is not None and (force or seen.status in _RETRYABLE):
                # The WHERE re-checks what we saw: of concurrent claimers, one row, one winner.
                took = await conn.execute(
                    update(t)
                    .where(key, t.c.send_id == seen.send_id, t.c.status == seen.status)
                    .values(
                        status="pending",
                        send_id=send_id,
                        message_id=None,
                        advertiser_id=advertiser_id,
                        updated_at=now,
                    )
                    .returning(t.c.id)
                )
                if took.first() is not None:
                    return ClaimResult(
                        claimed=True,
                        existing_status=cast(ClaimStatus, seen.status),
                        existing_send_id=seen.send_id,
                        existing_message_id=seen.message_id,
                        taken_over=True,
                    )
                seen = (await conn.execute(current)).first()
        if seen is None:
            # Deleted between our insert and our read: nothing holds it, but be conservative.
            return ClaimResult(claimed=False)
        return ClaimResult(
            claimed=False,
            existing_status=cast(ClaimStatus, seen.status),
            existing_send_id=seen.send_id,
            existing_message_id=seen.message_id,
        )

    async def finish(
        self,
        *,
        campaign_id: str,
        step: int,
        recipient_hash: str,
        send_id: str,
        status: ClaimStatus,
        message_id: str | None = None,
        message_key: str = "",
    ) -> bool:
        """Record the end of a send: only the holder of the claim (``send_id``) may.

        Returns:
            ``True`` if updated; ``False`` if the claim is gone or held by another send id.

        Raises:
            InvalidInputError: a malformed key or an unknown status.
            StoreError: the database failed.
        """
        _check_key(campaign_id, step, recipient_hash)
        if status not in CLAIM_STATUSES:
            raise InvalidInputError(f"claim status must be one of {CLAIM_STATUSES}: {status!r}")
        t = SEND_CLAIMS
        stmt = (
            update(t)
            .where(
                self._key(campaign_id, step, recipient_hash, message_key),
                t.c.send_id == send_id,
            )
            .values(status=status, message_id=message_id, updated_at=datetime.now(UTC))
            .returning(t.c.id)
        )
        async with self._db.transaction("finishing a send claim") as conn:
            return (await conn.execute(stmt)).first() is not None

    async def claim_many(
        self, requests: Sequence[ClaimRequest], *, force: bool = False
    ) -> list[ClaimResult]:
        """Claim many sends at once; results are in the order of ``requests``.

        New claims go in one multi-row ``INSERT ... ON CONFLICT DO NOTHING`` per 100 rows
        (one transaction); only the keys that already had a claim fall back to
        :meth:`claim` (a retry takes over ``failed``/``deferred``, else a duplicate). A key
        repeated within ``requests`` is claimed once; its repeats are duplicates of it.

        Raises:
            InvalidInputError: a malformed key or id.
            StoreError: the database failed (the caller must not send).
        """
        check_claim_requests(requests)
        if force:
            return [
                await self.claim(
                    campaign_id=r.campaign_id,
                    step=r.step,
                    recipient_hash=r.recipient_hash,
                    advertiser_id=r.advertiser_id,
                    send_id=r.send_id,
                    force=True,
                    message_key=r.message_key,
                )
                for r in requests
            ]
        if self.direct is not None and not self._db.closed:
            now = datetime.now(UTC)
            direct = self.direct
            return await direct.run(
                "claiming sends", lambda con: fastwrite.claim_many(con, requests, now)
            )
        t = SEND_CLAIMS
        now = datetime.now(UTC)
        first: dict[tuple[str, int, str, str], ClaimRequest] = {}
        for r in requests:
            first.setdefault((r.campaign_id, r.step, r.recipient_hash, r.message_key), r)
        unique = list(first.values())
        inserted: set[str] = set()
        async with self._db.transaction("claiming sends") as conn:
            for start in range(0, len(unique), 100):
                rows = [
                    {
                        "campaign_id": r.campaign_id,
                        "step": r.step,
                        "recipient_hash": r.recipient_hash,
                        "message_key": r.message_key,
                        "advertiser_id": r.advertiser_id,
                        "status": "pending",
                        "send_id": r.send_id,
                        "message_id": None,
                        "updated_at": now,
                    }
                    for r in unique[start : start + 100]
                ]
                result = await conn.execute(
                    self._db.insert(t).values(rows).on_conflict_do_nothing().returning(t.c.send_id)
                )
                inserted.update(result.scalars())
        results: list[ClaimResult] = []
        for r in requests:
            key = (r.campaign_id, r.step, r.recipient_hash, r.message_key)
            owner = first[key]
            if owner is not r:
                # The same key twice in one batch: the first occurrence holds the claim.
                results.append(
                    ClaimResult(
                        claimed=False, existing_status="pending", existing_send_id=owner.send_id
                    )
                )
            elif r.send_id in inserted:
                results.append(ClaimResult(claimed=True))
            else:
                results.append(
                    await self.claim(
                        campaign_id=r.campaign_id,
                        step=r.step,
                        recipient_hash=r.recipient_hash,
                        advertiser_id=r.advertiser_id,
                        send_id=r.send_id,
                        message_key=r.message_key,
                    )
                )
        return results

    async def finish_many(self, requests: Sequence[FinishRequest]) -> int:
        """Finish many claims in one transaction (group commit); returns how many matched.

        As with :meth:`finish`, only the holder of a claim (its ``send_id``) may finish it.

        Raises:
            InvalidInputError: a malformed key or an unknown status.
            StoreError: the database failed.
        """
        if not requests:
            return 0
        check_finish_requests(requests)
        now = datetime.now(UTC)
        if self.direct is not None and not self._db.closed:
            return await self.direct.run(
                "finishing send claims", lambda con: fastwrite.finish_many(con, requests, now)
            )
        t = SEND_CLAIMS
        matched = 0
        async with self._db.transaction("finishing send claims") as conn:
            for r in requests:
                # One statement per row: few rows per batch, and RETURNING tells who matched.
                result = await conn.execute(
                    update(t)
                    .where(
                        self._key(r.campaign_id, r.step, r.recipient_hash, r.message_key),
                        t.c.send_id == r.send_id,
                    )
                    .values(status=r.status, message_id=r.message_id, updated_at=now)
                    .returning(t.c.id)
                )
                matched += result.first() is not None
        return matched

    async def prior_contacts(self, advertiser_id: str, recipient_hashes: Sequence[str]) -> set[str]:
        """The hashes this advertiser already mailed (or is mailing), in any campaign.

        A ``sent`` or ``pending`` claim counts; used for the GDPR art. 14 first-contact flag.
        Call it before claiming the current send, or its own ``pending`` claim counts too.

        Raises:
            StoreError: the database failed.
        """
        t = SEND_CLAIMS
        wanted = list(dict.fromkeys(recipient_hashes))
        found: set[str] = set()
        if self.reader is not None and not self._db.closed:
            rows = await self.reader.fetch_in(
                "SELECT DISTINCT recipient_hash FROM send_claims WHERE advertiser_id = ?"
                " AND status IN ('sent', 'pending') AND recipient_hash IN (?*)",
                [advertiser_id],
                wanted,
            )
            return {r[0] for r in rows}
        async with self._db.connection("reading prior contacts") as conn:
            for start in range(0, len(wanted), _CHUNK):
                stmt = (
                    select(t.c.recipient_hash)
                    .where(
                        t.c.recipient_hash.in_(wanted[start : start + _CHUNK]),
                        t.c.advertiser_id == advertiser_id,
                        t.c.status.in_(("sent", "pending")),
                    )
                    .distinct()
                )
                found.update((await conn.execute(stmt)).scalars())
        return found

    async def statuses(
        self,
        campaign_id: str,
        step: int,
        recipient_hashes: Sequence[str],
        *,
        message_key: str = "",
    ) -> dict[str, ClaimStatus]:
        """``{recipient_hash: status}`` of the existing claims of one campaign step.

        Hashes without a claim are absent.

        Raises:
            StoreError: the database failed.
        """
        t = SEND_CLAIMS
        wanted = list(dict.fromkeys(recipient_hashes))
        found: dict[str, ClaimStatus] = {}
        if self.reader is not None and not self._db.closed:
            rows = await self.reader.fetch_in(
                "SELECT recipient_hash, status FROM send_claims WHERE campaign_id = ?"
                " AND step = ? AND message_key = ? AND recipient_hash IN (?*)",
                [campaign_id, step, message_key],
                wanted,
            )
            return {key: cast(ClaimStatus, status) for key, status in rows}
        async with self._db.connection("reading send claims") as conn:
            for start in range(0, len(wanted), _CHUNK):
                stmt = select(t.c.recipient_hash, t.c.status).where(
                    t.c.campaign_id == campaign_id,
                    t.c.step == step,
                    t.c.message_key == message_key,
                    t.c.recipient_hash.in_(wanted[start : start + _CHUNK]),
                )
                for key, status in await conn.execute(stmt):
                    found[key] = cast(ClaimStatus, status)
        return found

    async def by_send_id(self, send_id_or_prefix: str) -> ClaimRecord | None:
        """The claim whose send id is (or starts with, for 20+ hex digits) the given value.

        Used to resolve a short mailto/VERP token, which names the send by its first 20 hex
        digits. Returns ``None`` when nothing matches.

        Raises:
            InvalidInputError: not 20 to 64 lower-case hex digits.
            StoreError: the database failed.
        """
        if not re.fullmatch(r"[0-9a-f]{20,64}", send_id_or_prefix or ""):
            raise InvalidInputError("a send id (prefix) is 20 to 64 lower-case hex digits")
        t = SEND_CLAIMS
        # A range, not LIKE: it uses the send_id index on both SQLite and PostgreSQL
        # (hex digits all sort before "g").
        low, high = send_id_or_prefix, send_id_or_prefix + "g"
        stmt = (
            select(t)
            .where(t.c.send_id >= low, t.c.send_id < high)
            .order_by(t.c.updated_at.desc())
            .limit(1)
        )
        a = AUDIT_EVENTS
        # A forced resend takes the claim row over with a new send id; the earlier send's
        # mailto and VERP tokens must keep working (OPTOUT_LINK_VALIDITY): the append-only
        # audit log still knows it.
        from_audit = (
            select(
                a.c.campaign_id,
                a.c.step,
                a.c.recipient_hash,
                a.c.advertiser_id,
                a.c.status,
                a.c.send_id,
                a.c.message_id,
            )
            .where(a.c.send_id >= low, a.c.send_id < high, a.c.kind == "send")
            .order_by(a.c.seq.desc())
            .limit(1)
        )
        async with self._db.connection("finding a send claim") as conn:
            row = (await conn.execute(stmt)).first()
            if row is None:
                old = (await conn.execute(from_audit)).first()
        if row is not None:
            return ClaimRecord(
                campaign_id=row.campaign_id,
                step=row.step,
                recipient_hash=row.recipient_hash,
                message_key=row.message_key,
                advertiser_id=row.advertiser_id,
                status=cast(ClaimStatus, row.status),
                send_id=row.send_id,
                message_id=row.message_id,
            )
        if old is None or not old.recipient_hash or not old.campaign_id:
            return None
        status = old.status if old.status in CLAIM_STATUSES else "sent"
        return ClaimRecord(
            campaign_id=old.campaign_id,
            step=old.step or 1,
            recipient_hash=old.recipient_hash,
            message_key="",
            advertiser_id=old.advertiser_id or "",
            status=cast(ClaimStatus, status),
            send_id=old.send_id,
            message_id=old.message_id,
        )
