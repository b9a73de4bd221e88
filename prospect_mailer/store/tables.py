"""The store's tables, declared once with SQLModel.

Hot paths use SQLAlchemy Core on the ``Table`` objects exported here (``SUPPRESSION``,
``AUDIT_EVENTS``...) rather than ORM object loading: a point lookup through the ORM costs tens
of times more than a Core ``select()``.

Privacy by schema (CNIL MED-2023-040, RULES.md FR_SUPPRESSION_LIST_RETAINED): the suppression
table has no column able to hold a plaintext address, a name or any other personal detail; only
a SHA-256 key, the scope, the reason, the channel it came from and when. The audit log stores a
recipient hash and a masked address, never a body. Only ``prospects`` holds personal data: it is
the prospect file itself, deliberately kept apart from the suppression list.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlmodel import Field, SQLModel

__all__ = [
    "AUDIT_EVENTS",
    "AUDIT_HEAD",
    "CAMPAIGNS",
    "PROSPECTS",
    "SCHEMA_VERSION",
    "SEND_CLAIMS",
    "STORE_TABLES",
    "SUPPRESSION",
    "SUPPRESSION_KEY_PREFIX",
    "SUPPRESSION_PREFIX_SQL",
    "AuditEventRow",
    "AuditHeadRow",
    "CampaignRow",
    "ProspectRow",
    "SchemaVersionRow",
    "SendClaimRow",
    "SuppressionRow",
    "suppression_prefixes",
]

_HASH = 64  # lower-case hex SHA-256
#: Hex digits of a suppression key that the lookup index holds (64 bits: no two keys share
#: them in practice, and a lookup compares the whole key anyway).
SUPPRESSION_KEY_PREFIX = 16
#: The lookup index's expression; a lookup must spell it exactly so for the index to serve it.
SUPPRESSION_PREFIX_SQL = f"substr(key_hash, 1, {SUPPRESSION_KEY_PREFIX})"


def suppression_prefixes(keys: Iterable[str]) -> list[str]:
    """The distinct prefixes of ``keys`` that a lookup probes, in order. Two keys may share
    one: the rows found must still be matched on the whole key."""
    return list(dict.fromkeys(key[:SUPPRESSION_KEY_PREFIX] for key in keys))


# 64-bit chain positions on PostgreSQL; on SQLite ``INTEGER PRIMARY KEY`` (the rowid) is 64-bit.
_SEQ = BigInteger().with_variant(Integer, "sqlite")


class SchemaVersionRow(SQLModel, table=True):
    """One row (``id = 1``): the schema version this database was created or migrated to."""

    __tablename__ = "schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))


class SuppressionRow(SQLModel, table=True):
    """An objection (or bounce, complaint, manual block) keyed by a hash, never an address."""

    __tablename__ = "suppression"
    __table_args__ = (
        UniqueConstraint("kind", "key_hash", "scope", "scope_value", name="uq_suppression_entry"),
        # The key's first 16 hex digits (schema version 3): about 27 bytes an entry, a sixth
        # of the covering index it replaced, so a probe for an absent key (nearly every key
        # of a prospect list) reads fewer pages; a hit reads its row from the table.
        Index("ix_suppression_prefix", text(SUPPRESSION_PREFIX_SQL)),
        CheckConstraint("kind IN ('address', 'domain')", name="ck_suppression_kind"),
        CheckConstraint(
            "scope IN ('global', 'advertiser', 'campaign')", name="ck_suppression_scope"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=8)
    key_hash: str = Field(max_length=_HASH)
    scope: str = Field(max_length=16)
    scope_value: str = Field(default="", max_length=200)
    reason: str = Field(max_length=16)
    source: str = Field(max_length=200)
    created_at: datetime = Field(sa_type=DateTime(timezone=True))


class AuditHeadRow(SQLModel, table=True):
    """One row (``id = 1``): the chain head. Appenders lock it to serialise the chain."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0, sa_type=_SEQ)
    hash: str = Field(max_length=_HASH)


class AuditEventRow(SQLModel, table=True):
    """One audit event; ``hash`` chains it to the previous event (``prev_hash``)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_send_id", "send_id"),
        Index("ix_audit_events_campaign", "campaign_id", "step"),
        Index("ix_audit_events_recipient", "recipient_hash"),
        Index("ix_audit_events_created_at", "created_at"),
    )

    # ``seq`` is the chain position and the primary key: its uniqueness is the backstop that
    # makes two appenders unable to both write position N, whatever happens to the head lock.
    seq: int = Field(sa_column=Column(_SEQ, primary_key=True, autoincrement=False))
    event_id: str = Field(max_length=32, unique=True)
    send_id: str = Field(default="", max_length=64)
    created_at: str = Field(max_length=40)  # UTC ISO-8601 with microseconds, as hashed
    kind: str = Field(max_length=32)
    status: str = Field(max_length=32)
    campaign_id: str | None = Field(default=None, max_length=128)
    step: int | None = None
    advertiser_id: str | None = Field(default=None, max_length=128)
    purpose: str | None = Field(default=None, max_length=32)
    recipient_hash: str | None = Field(default=None, max_length=_HASH)
    recipient_masked: str | None = Field(default=None, max_length=300)
    message_id: str | None = Field(default=None, max_length=998)
    transport: str | None = Field(default=None, max_length=64)
    rule_ids: str = Field(default="", sa_type=Text)
    details: str = Field(default="{}", sa_type=Text)
    prev_hash: str = Field(max_length=_HASH)
    hash: str = Field(max_length=_HASH)


class SendClaimRow(SQLModel, table=True):
    """The idempotency key of a send: one row per (campaign, step, recipient, message key).

    ``message_key`` is empty for the library (a campaign step goes once to a recipient) and
    the Message-ID for the SMTP relay (a client's retry of one message is the duplicate).
    """

    __tablename__ = "send_claims"
    __table_args__ = (
        UniqueConstraint(
            "campaign_id", "step", "recipient_hash", "message_key", name="uq_send_claims_key"
        ),
        Index("ix_send_claims_recipient", "recipient_hash", "advertiser_id"),
        Index("ix_send_claims_send_id", "send_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: str = Field(max_length=128)
    step: int
    recipient_hash: str = Field(max_length=_HASH)
    message_key: str = Field(default="", max_length=255)
    advertiser_id: str = Field(max_length=128)
    status: str = Field(max_length=16)
    send_id: str = Field(max_length=64)
    message_id: str | None = Field(default=None, max_length=998)
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))


class ProspectRow(SQLModel, table=True):
    """A registered prospect (personal data by design): the ``Prospect`` model as JSON."""

    __tablename__ = "prospects"

    id: int | None = Field(default=None, primary_key=True)
    recipient_hash: str = Field(max_length=_HASH, unique=True)
    data: str = Field(sa_type=Text)
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))


def _table(model: type[SQLModel]) -> Table:
    return cast(Table, model.__table__)  # type: ignore[attr-defined]


SCHEMA_VERSION = _table(SchemaVersionRow)
SUPPRESSION = _table(SuppressionRow)
AUDIT_HEAD = _table(AuditHeadRow)
AUDIT_EVENTS = _table(AuditEventRow)
SEND_CLAIMS = _table(SendClaimRow)
PROSPECTS = _table(ProspectRow)

#: Every table of the store, in creation order (``create_all`` is limited to these, so tables
#: a user declares on the shared ``SQLModel.metadata`` are never created in our database).
STORE_TABLES: tuple[Table, ...] = (
    SCHEMA_VERSION,
    SUPPRESSION,
    AUDIT_HEAD,
    AUDIT_EVENTS,
    SEND_CLAIMS,
    PROSPECTS,
)


class CampaignRow(SQLModel, table=True):
    """A registered campaign step (the ``Campaign`` model as JSON), for the SMTP relay.

    In the database rather than in each relay's memory so that several relays sharing one
    PostgreSQL see the same campaigns the moment one is registered.
    """

    __tablename__ = "campaigns"
    __table_args__ = (UniqueConstraint("campaign_id", "step", name="uq_campaigns_key"),)

    id: int | None = Field(default=None, primary_key=True)
    campaign_id: str = Field(max_length=128)
    step: int
    data: str = Field(sa_type=Text)
    updated_at: datetime = Field(sa_type=DateTime(timezone=True))


CAMPAIGNS = _table(CampaignRow)
STORE_TABLES = (*STORE_TABLES, CAMPAIGNS)
