"""Audit events and records, and the chain hash (pure: no I/O).

An :class:`AuditEvent` is what a caller hands to :meth:`AuditLog.append`; an
:class:`AuditRecord` is what was stored: the event plus ``seq``, ``event_id``, ``created_at``,
``prev_hash`` and ``hash``. ``hash = sha256(prev_hash + canonical JSON of every other stored
field)``, canonical meaning sorted keys, ``separators=(",", ":")`` and ``ensure_ascii=False``;
the details are hashed as the exact JSON text stored and the time as the exact ISO string
stored, so nothing depends on how a database returns datetimes or JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from ..errors import InvalidInputError
from ..ids import new_id
from .suppression import check_hash
from .tables import AUDIT_EVENTS

__all__ = [
    "GENESIS_HASH",
    "HASHED_FIELDS",
    "AuditEvent",
    "AuditRecord",
    "EventSource",
    "VerifyResult",
    "built",
    "chain_hash",
    "chain_rows",
    "iso_utc",
]

#: ``prev_hash`` of the first record.
GENESIS_HASH = "0" * 64

_WORD = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_MASKED = re.compile(r"[^@\s]?\*\*\*@[^@\s]+")
_RULE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
# Something that looks like an e-mail address inside free text (an SMTP reply often echoes
# the recipient): masked before it reaches the log.
_ADDRESS_IN_TEXT = re.compile(r"([^\s@<>()\[\],;:\"']+)@([\w-]+(?:\.[\w-]+)+)")
_FORBIDDEN_DETAIL_KEYS = frozenset({"body", "html", "email", "address", "password", "token"})
_MAX_DETAILS = 64 * 1024

#: The stored fields covered by ``hash`` (all but ``prev_hash`` and ``hash``; ``prev_hash``
#: enters as the prefix).
HASHED_FIELDS: tuple[str, ...] = tuple(
    c.name for c in AUDIT_EVENTS.c if c.name not in ("prev_hash", "hash")
)


#: The canonical JSON of the chain: ``json.dumps(..., sort_keys=True, separators=(",", ":"),
#: ensure_ascii=False)``, the same text, without building an encoder per call (``dumps``
#: does, for any non-default option: 3 µs of a 25 µs record).
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def chain_hash(prev_hash: str, fields: Mapping[str, object]) -> str:
    """``sha256(prev_hash + canonical JSON of fields)`` as lower-case hex."""
    return hashlib.sha256((prev_hash + _canonical(fields)).encode("utf-8")).hexdigest()


def chain_rows(
    seq: int, prev_hash: str, rows: Sequence[Mapping[str, object]]
) -> list[dict[str, object]]:
    """``rows`` (from :meth:`AuditEvent._row`) numbered after ``seq`` and chained after
    ``prev_hash``: each gets ``seq``, ``prev_hash`` and ``hash`` (the stored form)."""
    full: list[dict[str, object]] = []
    for row in rows:
        seq += 1
        stored = {**row, "seq": seq}
        digest = chain_hash(prev_hash, stored)
        full.append({**stored, "prev_hash": prev_hash, "hash": digest})
        prev_hash = digest
    return full


def iso_utc(value: datetime) -> str:
    """``value`` in UTC as ISO-8601 with microseconds (naive means UTC): the stored form."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_PLAIN = frozenset({bool, int, float})


#: The stored text of ``details``: canonical JSON, dates and sets in their stored forms.
_details_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
).encode


def _scrub(value: object, key: str = "") -> object:
    """Mask address-like text and refuse keys that would carry a body or an address."""
    if value is None or type(value) in _PLAIN:
        return value  # nothing to mask in a number, a flag or text without '@'
    if type(value) is str and "@" not in value:
        return value
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for k, v in value.items():
            name = str(k)
            if name.lower() in _FORBIDDEN_DETAIL_KEYS:
                raise InvalidInputError(
                    f"audit details may not contain {name!r}: the log holds identifiers, "
                    "never a body, an address or a secret"
                )
            plain = v is None or type(v) in _PLAIN or (type(v) is str and "@" not in v)
            out[name] = v if plain else _scrub(v, name)  # the common case without a call
        return out
    if isinstance(value, (list, tuple)):
        return [_scrub(v, key) for v in value]
    if isinstance(value, str) and "@" in value and "message_id" not in key.lower():
        return _ADDRESS_IN_TEXT.sub(lambda m: f"{m.group(1)[:1]}***@{m.group(2)}", value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """An event to append; :meth:`AuditLog.append` adds seq, event id, time and hashes.

    Attributes:
        kind: ``send``, ``suppression``, ``purge``... (lower-case word).
        status: for sends ``pending``, ``sent``, ``blocked``, ``failed``, ``deferred``,
            ``duplicate``; for suppression ``added`` or ``removed``.
        send_id: groups the events of one send attempt.
        recipient_hash: SHA-256 hex key of the recipient (never the address).
        recipient_masked: masked address such as ``j***@example.com``.
        rule_ids: the rules that blocked (or were evaluated), in order.
        details: JSON-serialisable facts (rule results, legal basis, consent_ref, source
            name, first-contact flag, template hash, token id, SMTP code/reply, error).
            Address-like text is masked; keys ``body``, ``html``, ``email``, ``address``,
            ``password`` and ``token`` are refused.
        created_at: the event time, if not now (tests, imports).

    Raises:
        InvalidInputError: a field is malformed.
    """

    kind: str
    status: str
    send_id: str = ""
    campaign_id: str | None = None
    step: int | None = None
    advertiser_id: str | None = None
    purpose: str | None = None
    recipient_hash: str | None = None
    recipient_masked: str | None = None
    message_id: str | None = None
    transport: str | None = None
    rule_ids: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("kind", "status"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _WORD.fullmatch(value):
                raise InvalidInputError(f"audit {name} must be a short lower-case word: {value!r}")
        if self.recipient_hash is not None:
            check_hash(self.recipient_hash, what="recipient_hash")
        if self.recipient_masked is not None and not _MASKED.fullmatch(self.recipient_masked):
            raise InvalidInputError(
                "recipient_masked must look like 'j***@example.com' (masked, never the address)"
            )
        for rule in self.rule_ids:
            if not _RULE_ID.fullmatch(rule):
                raise InvalidInputError(f"invalid rule id {rule!r}")
        if self.step is not None and (isinstance(self.step, bool) or self.step < 1):
            raise InvalidInputError(f"step must be a positive integer, not {self.step!r}")

    def _row(self) -> dict[str, object]:
        try:
            details = _details_json(_scrub(self.details))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"audit details are not JSON serialisable: {exc}") from exc
        if len(details) > _MAX_DETAILS:
            raise InvalidInputError("audit details exceed 64 KiB: identifiers only, no bodies")
        return {
            "event_id": new_id(),
            "send_id": self.send_id,
            "created_at": iso_utc(self.created_at or datetime.now(UTC)),
            "kind": self.kind,
            "status": self.status,
            "campaign_id": self.campaign_id,
            "step": self.step,
            "advertiser_id": self.advertiser_id,
            "purpose": self.purpose,
            "recipient_hash": self.recipient_hash,
            "recipient_masked": self.recipient_masked,
            "message_id": self.message_id,
            "transport": self.transport,
            "rule_ids": ",".join(self.rule_ids),
            "details": details,
        }


#: A record, or a call that builds it where it is written (the pipeline's ``PlannedEvent``).
EventSource = AuditEvent | Callable[[], AuditEvent]


def built(event: EventSource) -> AuditEvent:
    """``event`` itself, or the record its call builds."""
    return event if isinstance(event, AuditEvent) else event()


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """A record as stored: the event plus its chain position and hashes.

    ``details_json`` is the exact hashed text; :attr:`details` parses it.
    """

    seq: int
    event_id: str
    send_id: str
    created_at: datetime
    kind: str
    status: str
    campaign_id: str | None
    step: int | None
    advertiser_id: str | None
    purpose: str | None
    recipient_hash: str | None
    recipient_masked: str | None
    message_id: str | None
    transport: str | None
    rule_ids: tuple[str, ...]
    details_json: str
    prev_hash: str
    hash: str

    @property
    def details(self) -> dict[str, Any]:
        """The details as a dict."""
        parsed: dict[str, Any] = json.loads(self.details_json)
        return parsed

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> AuditRecord:
        rules = row["rule_ids"]
        return cls(
            seq=int(row["seq"]),
            event_id=row["event_id"],
            send_id=row["send_id"],
            created_at=datetime.fromisoformat(row["created_at"]),
            kind=row["kind"],
            status=row["status"],
            campaign_id=row["campaign_id"],
            step=row["step"],
            advertiser_id=row["advertiser_id"],
            purpose=row["purpose"],
            recipient_hash=row["recipient_hash"],
            recipient_masked=row["recipient_masked"],
            message_id=row["message_id"],
            transport=row["transport"],
            rule_ids=tuple(rules.split(",")) if rules else (),
            details_json=row["details"],
            prev_hash=row["prev_hash"],
            hash=row["hash"],
        )


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of :meth:`AuditLog.verify`.

    Attributes:
        ok: the chain is intact from the first record to the head.
        count: records checked.
        first_bad_seq: the first position found wrong (a missing, edited or misplaced record),
            or ``None`` when ``ok``.
        reason: what was found, in words.
    """

    ok: bool
    count: int
    first_bad_seq: int | None
    reason: str
