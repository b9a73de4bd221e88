"""Registered campaigns (``store.campaigns``): what the SMTP relay binds messages to.

A campaign step is stored as the :class:`~prospect_mailer.models.Campaign` model in JSON, keyed
by ``(campaign_id, step)``. Kept in the database, not in a relay's memory, so that several relays
sharing one PostgreSQL agree on the campaigns the moment one is registered.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from pydantic import ValidationError
from sqlalchemy import delete, select

from ..errors import StoreError
from ..models import Campaign
from .engine import Database
from .fastread import SQLiteReader
from .tables import CAMPAIGNS

__all__ = ["CampaignStore"]


@functools.lru_cache(maxsize=64)
def _load(key: str, data: str) -> Campaign:
    # Memoised on the stored JSON: the relay reads its campaign on every MAIL FROM, and the
    # model is frozen, so one parsed object can serve every reader of the same text.
    try:
        return Campaign.model_validate_json(data)
    except ValidationError as exc:
        raise StoreError(f"stored campaign {key} is unreadable: {exc}") from exc


class CampaignStore:
    """Campaign steps registered in the store."""

    def __init__(self, db: Database, reader: SQLiteReader | None = None) -> None:
        self._db = db
        self.reader = reader  # SQLite: direct reads (the relay reads a campaign per message)

    async def upsert(self, campaign: Campaign) -> None:
        """Register ``campaign`` or replace the one with the same id and step.

        Raises:
            StoreError: the database failed.
        """
        stmt = self._db.insert(CAMPAIGNS).values(
            campaign_id=campaign.id,
            step=campaign.step,
            data=campaign.model_dump_json(),
            updated_at=datetime.now(UTC),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[CAMPAIGNS.c.campaign_id, CAMPAIGNS.c.step],
            set_={"data": stmt.excluded.data, "updated_at": stmt.excluded.updated_at},
        )
        async with self._db.transaction("registering a campaign") as conn:
            await conn.execute(stmt)

    async def get(self, campaign_id: str, step: int = 1) -> Campaign | None:
        """The registered campaign ``campaign_id`` at ``step``, or ``None``.

        Raises:
            StoreError: the database failed.
        """
        t = CAMPAIGNS
        data: str | None
        if self.reader is not None and not self._db.closed:
            rows = await self.reader.fetch(
                "SELECT data FROM campaigns WHERE campaign_id = ? AND step = ?", [campaign_id, step]
            )
            data = rows[0][0] if rows else None
        else:
            stmt = select(t.c.data).where(t.c.campaign_id == campaign_id, t.c.step == step)
            async with self._db.connection("reading a campaign") as conn:
                data = (await conn.execute(stmt)).scalar_one_or_none()
        return None if data is None else _load(f"{campaign_id}:{step}", data)

    async def list(self) -> list[Campaign]:
        """Every registered campaign step, ordered by id then step.

        Raises:
            StoreError: the database failed.
        """
        t = CAMPAIGNS
        stmt = select(t.c.campaign_id, t.c.step, t.c.data).order_by(t.c.campaign_id, t.c.step)
        async with self._db.connection("listing campaigns") as conn:
            rows = (await conn.execute(stmt)).all()
        return [_load(f"{cid}:{step}", data) for cid, step, data in rows]

    async def delete(self, campaign_id: str, step: int = 1) -> bool:
        """Unregister one campaign step; ``True`` if it was registered.

        Raises:
            StoreError: the database failed.
        """
        t = CAMPAIGNS
        stmt = delete(t).where(t.c.campaign_id == campaign_id, t.c.step == step).returning(t.c.id)
        async with self._db.transaction("deleting a campaign") as conn:
            return (await conn.execute(stmt)).first() is not None
