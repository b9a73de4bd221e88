"""The store: suppression list, audit log, send claims and prospects in one database.

SQLite (a file, WAL) by default; PostgreSQL to share one suppression list and one audit log
between several processes or machines. Correctness under concurrency comes from the database
(unique constraints, transactions, row locks), never from in-process locks. Every database
failure surfaces as :class:`~prospect_mailer.errors.StoreError`.

::

    async with Store.connect("prospects.db") as store:
        hits = await store.suppression.lookup([address.key_hash, *domain_keys_for(domain)])
"""

from .audit import AuditLog
from .audit_records import GENESIS_HASH, AuditEvent, AuditRecord, VerifyResult, chain_hash
from .audit_writer import AuditWriter
from .claims import (
    CLAIM_STATUSES,
    ClaimRecord,
    ClaimRequest,
    ClaimResult,
    ClaimStatus,
    FinishRequest,
    SendClaims,
)
from .core import CURRENT_SCHEMA_VERSION, Store
from .engine import parse_url, sqlite_url, translate_errors
from .prospects import ProspectRegistry
from .suppression import (
    SUPPRESSION_KINDS,
    SUPPRESSION_REASONS,
    SUPPRESSION_SCOPES,
    SuppressionHit,
    SuppressionKind,
    SuppressionList,
    check_hash,
)

__all__ = [
    "CLAIM_STATUSES",
    "CURRENT_SCHEMA_VERSION",
    "GENESIS_HASH",
    "SUPPRESSION_KINDS",
    "SUPPRESSION_REASONS",
    "SUPPRESSION_SCOPES",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "AuditWriter",
    "ClaimRecord",
    "ClaimRequest",
    "ClaimResult",
    "ClaimStatus",
    "FinishRequest",
    "ProspectRegistry",
    "SendClaims",
    "Store",
    "SuppressionHit",
    "SuppressionKind",
    "SuppressionList",
    "VerifyResult",
    "chain_hash",
    "check_hash",
    "parse_url",
    "sqlite_url",
    "translate_errors",
]
