"""The evidence pack: what a DPO hands a regulator or a data subject about one address.

:func:`build_evidence` gathers the facts from the store (read only), :class:`EvidencePack`
holds them, and :func:`render_evidence` turns the pack into Markdown, JSON, or one
self-contained printable HTML page (inline CSS, no external resource), from the Jinja2
templates ``templates/evidence/pack.md.j2`` and ``pack.html.j2``.

What it shows (RULES.md GDPR_ACCOUNTABILITY_RECORDS, GDPR_ART7_CONSENT_PROOF, section G):

* where the data came from and on what legal basis, from the prospect registry when the
  prospect is registered, else from what the audit log recorded at the last send;
* every send, block and objection event of the audit log for the address's hash, with dates,
  campaign and rule ids, and whether the audit chain verifies;
* the objections on the suppression list (address, its domain or a parent domain; any scope)
  and when each took effect;
* the check that nothing covered by an objection was sent after it took effect.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel, ConfigDict

from .addresses import domain_keys_of, normalise
from .store import AuditRecord, Store, SuppressionHit

__all__ = [
    "EvidenceEvent",
    "EvidenceFormat",
    "EvidencePack",
    "Objection",
    "build_evidence",
    "render_evidence",
]

EvidenceFormat = Literal["markdown", "json", "html"]
_ORIGIN_FIELDS = (
    "source_type", "source_name", "collection_method", "collecting_entity", "collected_at",
    "transfer_hops", "optout_offered_at_collection", "last_activity_at", "customer_since",
    "customer_until", "recipient_type", "job_function", "country",
)  # fmt: skip
_CONSENT_FIELDS = (
    "legal_basis", "consent_ref", "consent_at", "consent_withdrawn_at", "consent_advertisers",
)  # fmt: skip
_SENT = frozenset({"sent", "pending"})  # pending: handed to the transport, result unknown


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class EvidenceEvent(_Model):
    """One audit record about the address, in a reader's terms."""

    seq: int
    at: datetime
    kind: str
    status: str
    campaign_id: str | None = None
    step: int | None = None
    advertiser_id: str | None = None
    rule_ids: tuple[str, ...] = ()
    message_id: str | None = None
    send_id: str = ""
    note: str = ""


class Objection(_Model):
    """A suppression entry covering the address (on it, or on its domain)."""

    kind: str
    scope: str
    scope_value: str
    reason: str
    source: str
    effective_at: datetime

    def covers(self, event: EvidenceEvent) -> bool:
        """``True`` if a send of ``event``'s advertiser/campaign is within this objection."""
        if self.scope == "global":
            return True
        if self.scope == "advertiser":
            return event.advertiser_id == self.scope_value
        return event.campaign_id == self.scope_value


class EvidencePack(_Model):
    """Everything known about one address, ready to render."""

    generated_at: datetime
    masked_address: str
    recipient_hash: str
    registered: bool
    data_source: Literal["prospect registry", "audit log", "none"]
    origin: dict[str, Any]
    consent: dict[str, Any]
    events: tuple[EvidenceEvent, ...]
    objections: tuple[Objection, ...]
    first_objection_at: datetime | None
    sent_after_objection: tuple[EvidenceEvent, ...]
    blocked_after_objection: int
    audit_chain_ok: bool
    audit_chain_detail: str

    @property
    def clean(self) -> bool:
        """No covered send after an objection, and the audit chain verifies."""
        return not self.sent_after_objection and self.audit_chain_ok

    @property
    def counts(self) -> dict[str, int]:
        """Send events by status."""
        out: dict[str, int] = {}
        for e in self.events:
            if e.kind == "send":
                out[e.status] = out.get(e.status, 0) + 1
        return out


def _note(record: AuditRecord) -> str:
    d = record.details
    if record.kind == "suppression":
        parts = [f"{k}={d[k]}" for k in ("scope", "scope_value", "reason") if d.get(k)]
        if d.get("removal_reason"):
            parts.append(f"removal reason: {d['removal_reason']}")
        return ", ".join(parts)
    if record.kind == "purge":
        return f"profile purged (retention expired {str(d.get('expired_at', ''))[:10]})"
    for key in ("smtp_reply", "error", "existing_send_id"):
        if d.get(key):
            return f"{key}: {d[key]}"
    return ""


def _event(record: AuditRecord) -> EvidenceEvent:
    return EvidenceEvent(
        seq=record.seq,
        at=record.created_at,
        kind=record.kind,
        status=record.status,
        campaign_id=record.campaign_id,
        step=record.step,
        advertiser_id=record.advertiser_id,
        rule_ids=record.rule_ids,
        message_id=record.message_id,
        send_id=record.send_id,
        note=_note(record),
    )


def _objection(hit: SuppressionHit) -> Objection:
    return Objection(
        kind=hit.kind,
        scope=hit.scope,
        scope_value=hit.scope_value,
        reason=hit.reason,
        source=hit.source,
        effective_at=hit.created_at,
    )


async def build_evidence(
    store: Store, address: str, *, now: datetime | None = None, verify_chain: bool = True
) -> EvidencePack:
    """Gather the evidence pack for ``address`` (read only).

    Args:
        store: the opened store.
        address: the address, in any form that normalises to it.
        now: the generation time shown in the pack (default now).
        verify_chain: verify the whole audit chain (proves the events were not edited).

    Raises:
        InvalidAddressError: the address cannot be normalised.
        StoreError: the database failed.
    """
    a = normalise(address)
    key = a.key_hash
    prospect = await store.prospects.get(address)
    records: list[AuditRecord] = []
    async for record in store.audit.iter_events(recipient_hash=key):
        records.append(record)
    events = tuple(_event(r) for r in records)
    hits = await store.suppression.lookup([key, *domain_keys_of(a)])
    objections = tuple(
        sorted((_objection(h) for hs in hits.values() for h in hs), key=lambda o: o.effective_at)
    )
    if prospect is not None:
        data = prospect.model_dump(mode="json")
        source: Literal["prospect registry", "audit log", "none"] = "prospect registry"
        origin = {k: data[k] for k in _ORIGIN_FIELDS if data.get(k) not in (None, (), [])}
        consent = {k: data[k] for k in _CONSENT_FIELDS if data.get(k) not in (None, (), [])}
    else:
        last = next((r for r in reversed(records) if r.kind == "send"), None)
        details = last.details if last is not None else {}
        source = "audit log" if last is not None else "none"
        origin = {k: details[k] for k in ("source_type", "source_name") if details.get(k)}
        if details.get("recipient_type"):
            origin["recipient_type"] = details["recipient_type"]
        consent = {k: details[k] for k in ("legal_basis", "consent_ref") if details.get(k)}
    sent_after: list[EvidenceEvent] = []
    blocked_after = 0
    for e in events:
        if e.kind != "send":
            continue
        covering = [o for o in objections if o.effective_at <= e.at and o.covers(e)]
        if not covering:
            continue
        if e.status in _SENT:
            sent_after.append(e)
        elif e.status == "blocked":
            blocked_after += 1
    if verify_chain:
        result = await store.audit.verify()
        chain_ok, chain_detail = result.ok, result.reason
    else:
        chain_ok, chain_detail = True, "not verified"
    return EvidencePack(
        generated_at=now or datetime.now(UTC),
        masked_address=a.masked,
        recipient_hash=key,
        registered=prospect is not None,
        data_source=source,
        origin=origin,
        consent=consent,
        events=events,
        objections=objections,
        first_objection_at=objections[0].effective_at if objections else None,
        sent_after_objection=tuple(sent_after),
        blocked_after_objection=blocked_after,
        audit_chain_ok=chain_ok,
        audit_chain_detail=chain_detail,
    )


def _template_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [d / "evidence" for d in (here / "templates", here.parent / "templates")]


def _env() -> Environment:
    loaders = [FileSystemLoader(str(d)) for d in _template_dirs() if d.is_dir()]
    env = Environment(
        loader=ChoiceLoader(loaders),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = lambda d: d.strftime("%Y-%m-%d %H:%M:%S UTC") if d else "-"
    # A Markdown table cell: one line, no column separator.
    env.filters["cell"] = lambda v: " ".join(str(v).split()).replace("|", "\\|")
    return env


def render_evidence(pack: EvidencePack, fmt: EvidenceFormat) -> str:
    """Render ``pack`` as ``markdown``, ``json`` or ``html`` (one self-contained page)."""
    if fmt == "json":
        data = pack.model_dump(mode="json")
        data["clean"] = pack.clean
        data["counts"] = pack.counts
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    name = "pack.md.j2" if fmt == "markdown" else "pack.html.j2"
    return _env().get_template(name).render(pack=pack, counts=pack.counts)
