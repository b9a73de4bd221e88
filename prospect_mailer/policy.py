"""The rules, as pure functions: ``decide(prospect, campaign, facts, now) -> Decision``.

No I/O happens here (no asyncio, database or SMTP import): the pipeline gathers the facts first
(suppression hits, prior contact, role classification), then calls :func:`decide`. The clock is
a parameter. Each rule is a small named unit carrying its id (RULES.md) and legal source, and
the decision lists *every* rule that failed, not only the first.

Fail-closed convention: an unknown fact never counts in the recipient's favour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from functools import lru_cache

from .models import (
    Campaign,
    Decision,
    Prospect,
    RecipientType,
    RuleOutcome,
    RuleResult,
    trusted,
)

__all__ = [
    "ARTICLE14_NOTICE_DELAY",
    "RETENTION_YEARS",
    "RULES",
    "RULES_BY_ID",
    "Facts",
    "RetentionStatus",
    "Rule",
    "SuppressionMatch",
    "decide",
    "effective_recipient_type",
    "explain",
    "retention_status",
    "stable_until",
]

#: FR_PROSPECT_RETENTION_3Y: prospect data kept at most 3 years from the last prospect contact.
RETENTION_YEARS = 3
#: GDPR art. 14(3)(a): notice within a reasonable period and at the latest one month.
ARTICLE14_NOTICE_DELAY = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class SuppressionMatch:
    """A suppression entry that matched the recipient's address or domain (a fact)."""

    kind: str  # "address" | "domain"
    scope: str  # "global" | "advertiser" | "campaign"
    scope_value: str
    reason: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the store and the classifier know about one recipient, gathered before deciding.

    Attributes:
        suppression: every suppression entry whose key matched (any scope; scope is judged
            here, so the rule is testable without a database).
        prior_contact: this advertiser already sent (or is sending) prospecting mail to the
            recipient; ``False`` makes this the first contact (GDPR art. 14, FR partner rule).
        role_address: the role classifier says the address is a generic role mailbox.
        repermission_already_sent: the one re-permission message was already sent.
    """

    suppression: Sequence[SuppressionMatch] = ()
    prior_contact: bool = False
    role_address: bool = False
    repermission_already_sent: bool = False
    classifier_version: str = ""


@dataclass(slots=True)  # not frozen: built for every decision, and frozen costs 1 µs more
class _Ctx:
    prospect: Prospect
    campaign: Campaign
    facts: Facts
    now: datetime
    rtype: RecipientType
    prospecting: bool


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its id (RULES.md), legal source, and a check returning a :class:`RuleResult`."""

    rule_id: str
    source: str
    check: Callable[[_Ctx], RuleResult] = field(repr=False)


def _result(rule_id: str, outcome: RuleOutcome, reason: str) -> RuleResult:
    """A :class:`RuleResult` without pydantic's validation: every field is this module's own
    (rule ids and outcomes are literals here, reasons are built from validated models), and
    validating each result cost about 2% of a relayed message."""
    return trusted(RuleResult, {"rule_id": rule_id, "outcome": outcome, "reason": reason})


@lru_cache(maxsize=256)
def _fixed(rule_id: str, outcome: RuleOutcome, reason: str = "") -> RuleResult:
    """A result whose reason holds no data of the prospect (none, or only the campaign's or
    the classifier's): an immutable value, built once (a pydantic model costs 1.5 µs, and every
    send decides eleven rules, twice in the relay). A reason with the prospect's own data
    (consent reference, job title, dates) is never kept: call :func:`_result` for it."""
    return _result(rule_id, outcome, reason)


def _ok(rule_id: str, reason: str = "") -> RuleResult:
    if not reason:
        return _fixed(rule_id, "pass")
    return _result(rule_id, "pass", reason)


def _fail(rule_id: str, reason: str) -> RuleResult:
    return _result(rule_id, "fail", reason)


def _na(rule_id: str, reason: str = "") -> RuleResult:
    if not reason:
        return _fixed(rule_id, "not_applicable")
    return _result(rule_id, "not_applicable", reason)


def effective_recipient_type(prospect: Prospect, facts: Facts) -> RecipientType:
    """The recipient type the rules apply.

    A declared type is kept, except that ``generic_role`` needs the classifier's agreement
    (else the address is treated as an individual's). Unknown: a role mailbox is
    ``generic_role``, anything else an ``individual`` (the strictest regime).
    """
    declared = prospect.recipient_type
    if declared == "generic_role":
        return "generic_role" if facts.role_address else "individual"
    if declared is not None:
        return declared
    return "generic_role" if facts.role_address else "individual"


# -- consent helpers ----------------------------------------------------------------------------


def _consent_problem(c: _Ctx, *, explicit_list: bool) -> str | None:
    """Why the prospect's consent does not cover this send, or None if it does."""
    p, adv = c.prospect, c.campaign.advertiser.id
    if p.legal_basis != "consent":
        return f"legal basis is {p.legal_basis or 'unknown'}, not consent"
    if not p.consent_ref:
        return "no consent_ref"
    if p.consent_withdrawn_at is not None and p.consent_withdrawn_at <= c.now:
        return f"consent {p.consent_ref} withdrawn on {p.consent_withdrawn_at.date()}"
    if p.consent_at is not None and p.consent_at > c.now:
        return f"consent {p.consent_ref} is dated in the future"
    if adv in p.consent_advertisers:
        return None
    if explicit_list:
        return f"advertiser {adv!r} is not in the partner list consented to"
    if not p.consent_advertisers and p.collecting_entity in (None, adv):
        return None  # consent collected by the advertiser itself
    return f"consent {p.consent_ref} does not cover advertiser {adv!r}"


def _soft_opt_in_problems(c: _Ctx) -> list[str]:
    p, camp = c.prospect, c.campaign
    problems = []
    if p.customer_since is None:
        problems.append("no customer_since (address not obtained during a sale)")
    if not p.sale_ref:
        problems.append("no sale_ref")
    if p.collecting_entity != camp.advertiser.id:
        problems.append(
            f"collected by {p.collecting_entity or 'unknown'}, not by {camp.advertiser.id}"
        )
    if p.optout_offered_at_collection is not True:
        problems.append("opt-out not shown to have been offered at collection")
    analogue = {camp.category, *camp.analogous_categories} - {""}
    if not analogue.intersection(p.purchased_categories):
        problems.append(
            f"campaign category {camp.category!r} is not analogous to purchases "
            f"{sorted(p.purchased_categories)}"
        )
    return problems


@lru_cache(maxsize=64)
def _casefolded(functions: tuple[str, ...]) -> frozenset[str]:
    """A campaign's target functions, case-folded (a campaign's data, kept per tuple)."""
    return frozenset(t.casefold() for t in functions)


def _b2b_problems(c: _Ctx) -> list[str]:
    p, camp = c.prospect, c.campaign
    problems = []
    if not p.job_function:
        problems.append("no job_function")
    else:
        if p.job_function.casefold() not in _casefolded(tuple(camp.target_functions)):
            problems.append(
                f"job_function {p.job_function!r} not in target_functions "
                f"{sorted(camp.target_functions)}"
            )
    if p.optout_offered_at_collection is not True:
        problems.append("not shown to have been told of prospecting use and offered an opt-out")
    return problems


# -- the rules ----------------------------------------------------------------------------------


def _scope(c: _Ctx) -> RuleResult:
    rid = "FR_SCOPE_DIRECT_PROSPECTING"
    if c.campaign.purpose is None:
        return _fail(rid, "campaign does not declare purpose (prospecting|transactional)")
    return _fixed(rid, "pass", f"purpose={c.campaign.purpose}")


def _suppression(c: _Ctx) -> RuleResult:
    rid = "SUPP_CHECK_AT_SEND"
    camp = c.campaign
    for m in c.facts.suppression:
        applies = (
            m.scope == "global"
            or (m.scope == "advertiser" and m.scope_value == camp.advertiser.id)
            or (m.scope == "campaign" and m.scope_value in (camp.id, camp.category))
        )
        if applies:
            where = m.scope if m.scope == "global" else f"{m.scope} {m.scope_value}"
            return _fail(rid, f"{m.kind} suppressed ({m.reason}, {where})")
    return _ok(rid)


def _b2c_consent(c: _Ctx) -> RuleResult:
    rid = "FR_B2C_CONSENT_REQUIRED"
    if not c.prospecting:
        return _fixed(rid, "not_applicable", "not prospecting")
    if c.rtype == "generic_role":
        return _fixed(rid, "not_applicable", "generic role address")
    if c.rtype == "professional" and not _b2b_problems(c):
        return _fixed(rid, "not_applicable", "B2B professional relevance applies")
    if c.prospect.legal_basis == "soft_opt_in" and c.rtype == "individual":
        return (
            _ok(rid, "soft opt-in")
            if not _soft_opt_in_problems(c)
            else _fail(rid, "soft opt-in conditions not met and no consent")
        )
    problem = _consent_problem(c, explicit_list=False)
    if problem is None:
        return _ok(rid, f"consent {c.prospect.consent_ref}")
    if c.rtype == "professional":
        return _fail(rid, f"not job-relevant, so consent is needed: {problem}")
    return _fail(rid, problem)


def _soft_opt_in(c: _Ctx) -> RuleResult:
    rid = "FR_B2C_SOFT_OPT_IN"
    if not c.prospecting or c.prospect.legal_basis != "soft_opt_in":
        return _na(rid)
    problems = _soft_opt_in_problems(c)
    return _fail(rid, "; ".join(problems)) if problems else _ok(rid)


def _b2b(c: _Ctx) -> RuleResult:
    rid = "FR_B2B_PROFESSIONAL_RELEVANCE"
    if not c.prospecting or c.rtype != "professional":
        return _na(rid)
    problems = _b2b_problems(c)
    if not problems:
        return _ok(rid, f"job_function {c.prospect.job_function!r} targeted")
    if _consent_problem(c, explicit_list=False) is None:
        return _na(rid, "not job-relevant but consent covers it")
    return _fail(rid, "; ".join(problems))


def _role(c: _Ctx) -> RuleResult:
    rid = "FR_GENERIC_ROLE_ADDRESS"
    declared = c.prospect.recipient_type
    if declared == "generic_role" and not c.facts.role_address:
        # Not a block by itself: the recipient is then treated as an individual, and the
        # consent rule decides. Recorded so that the downgrade is visible in the audit.
        return _result(
            rid,
            "warn",
            f"declared generic_role but not a role mailbox ({c.facts.classifier_version});"
            " treated as individual",
        )
    if c.rtype == "generic_role":
        reason = f"role mailbox ({c.facts.classifier_version}); consent not required"
        return _fixed(rid, "pass", reason)
    return _na(rid)


def _identity(c: _Ctx) -> RuleResult:
    rid = "FR_SENDER_IDENTITY"
    adv, camp = c.campaign.advertiser, c.campaign
    missing = [
        name
        for name, value in (
            ("advertiser.legal_name", adv.legal_name),
            ("advertiser.postal_address", adv.postal_address),
            ("advertiser.contact", adv.contact),
            ("from_name", camp.from_name),
        )
        if not value.strip()
    ]
    return _fail(rid, "missing " + ", ".join(missing)) if missing else _ok(rid)


def _add_years(d: datetime, years: int) -> datetime:
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February
        return d.replace(year=d.year + years, day=28)


@dataclass(frozen=True, slots=True)
class RetentionStatus:
    """Where a prospect stands against FR_PROSPECT_RETENTION_3Y at a given time.

    Attributes:
        current_customer: a customer whose relationship has not ended (no expiry runs).
        reference: the last of ``collected_at``, ``last_activity_at`` and ``customer_until``
            (the last contact coming from the person), or ``None`` when none is known.
        expires_at: ``reference`` plus :data:`RETENTION_YEARS`, or ``None``.
        expired: ``now`` is past ``expires_at`` (``False`` when it cannot be computed).
    """

    current_customer: bool
    reference: datetime | None
    expires_at: datetime | None
    expired: bool


def retention_status(prospect: Prospect, now: datetime) -> RetentionStatus:
    """FR_PROSPECT_RETENTION_3Y for one prospect at ``now`` (timezone-aware).

    The rule applied at send time and the retention purge both use this function, so the
    two can never disagree about when a prospect's data expires.
    """
    p = prospect
    if p.customer_since is not None and (
        p.customer_until is None or p.customer_until >= now.date()
    ):
        return RetentionStatus(True, None, None, False)
    refs: list[datetime] = [d for d in (p.collected_at, p.last_activity_at) if d is not None]
    if p.customer_until is not None:
        refs.append(datetime.combine(p.customer_until, datetime.min.time(), now.tzinfo))
    if not refs:
        return RetentionStatus(False, None, None, False)
    ref = max(refs)
    expiry = _add_years(ref, RETENTION_YEARS)
    return RetentionStatus(False, ref, expiry, now > expiry)


def stable_until(prospect: Prospect, now: datetime) -> datetime | None:
    """Until when :func:`decide` keeps its answer for ``prospect`` as time passes.

    Every rule reads the clock only to compare it with a date of the prospect's: consent
    given (``consent_at``) or withdrawn, the day after ``customer_until``, the retention
    expiry, the end of the art. 14 notice month after ``collected_at``. With the same
    campaign and facts, ``decide`` gives the same decision at every ``t`` with
    ``now <= t < stable_until(prospect, now)`` (same time zone); ``None``: at every later ``t``.
    The earliest of those dates not before ``now``: one equal to ``now`` leaves no window.
    """
    p = prospect
    found: list[datetime] = [t for t in (p.consent_at, p.consent_withdrawn_at) if t is not None]
    if p.customer_until is not None:
        found.append(datetime.combine(p.customer_until + timedelta(days=1), time(), now.tzinfo))
    expiry = retention_status(p, now).expires_at
    if expiry is not None:
        found.append(expiry)
    if p.collected_at is not None:
        found.append(p.collected_at + ARTICLE14_NOTICE_DELAY)
    return min((t for t in found if t >= now), default=None)


def _retention(c: _Ctx) -> RuleResult:
    rid = "FR_PROSPECT_RETENTION_3Y"
    if not c.prospecting:
        return _fixed(rid, "not_applicable", "not prospecting")
    status = retention_status(c.prospect, c.now)
    if status.current_customer:
        return _fixed(rid, "pass", "current customer")
    if status.reference is None or status.expires_at is None:
        return _fail(rid, "collected_at unknown: retention cannot be shown")
    ref, expiry = status.reference, status.expires_at
    if not status.expired:
        return _ok(rid, f"within retention until {expiry.date()}")
    if c.campaign.repermission and not c.facts.repermission_already_sent:
        return _result(rid, "warn", "past retention: re-permission message")
    return _fail(rid, f"past retention since {expiry.date()} (last prospect contact {ref.date()})")


def _partner(c: _Ctx) -> RuleResult:
    rid = "FR_PARTNER_TRANSFER_CONSENT"
    p = c.prospect
    if not c.prospecting or p.source_type not in ("partner", "broker"):
        return _na(rid)
    if p.transfer_hops > 1:
        return _fail(rid, f"record passed through {p.transfer_hops} transfers; onward transfer")
    if c.rtype == "individual":
        problem = _consent_problem(c, explicit_list=True)
        return _fail(rid, problem) if problem else _ok(rid, "advertiser in partner list")
    if c.rtype == "professional" and p.optout_offered_at_collection is not True:
        if _consent_problem(c, explicit_list=True) is None:
            return _ok(rid, "advertiser in partner list")
        return _fail(rid, "not shown that the person was told the address would be passed on")
    return _ok(rid)


def _art14(c: _Ctx) -> RuleResult:
    rid = "GDPR_ART14_NOTICE_FIRST_CONTACT"
    p = c.prospect
    if p.source_type is None:
        return _fail(rid, "source_type unknown: origin of the data cannot be stated")
    if p.source_type == "direct":
        return _fixed(rid, "not_applicable", "data obtained from the person")
    if not p.source_name:
        return _fail(rid, f"source_type={p.source_type} but no source_name to state")
    if (
        not c.facts.prior_contact
        and p.collected_at is not None
        and c.now - p.collected_at > ARTICLE14_NOTICE_DELAY
    ):
        return _result(
            rid,
            "warn",
            f"first contact more than a month after collection ({p.collected_at.date()})",
        )
    return _fixed(
        rid, "pass", "origin notice in footer" + ("" if c.facts.prior_contact else ", first")
    )


def _art7(c: _Ctx) -> RuleResult:
    rid = "GDPR_ART7_CONSENT_PROOF"
    p = c.prospect
    if p.legal_basis != "consent":
        return _na(rid)
    if not p.consent_ref:
        return _fail(rid, "legal basis consent without consent_ref")
    if p.consent_at is None:
        return _fail(rid, f"consent {p.consent_ref} has no date: cannot be proven")
    return _ok(rid)


#: Every rule, in evaluation order.
RULES: tuple[Rule, ...] = (
    Rule("FR_SCOPE_DIRECT_PROSPECTING", "CPCE L.34-5; Dir. 2002/58 art. 13", _scope),
    Rule("SUPP_CHECK_AT_SEND", "GDPR art. 21(3); CNIL liste repoussoir", _suppression),
    Rule("FR_SENDER_IDENTITY", "CPCE L.34-5; LCEN art. 20", _identity),
    Rule("FR_B2C_CONSENT_REQUIRED", "CPCE L.34-5; GDPR art. 4(11), 7", _b2c_consent),
    Rule("FR_B2C_SOFT_OPT_IN", "CPCE L.34-5; Dir. 2002/58 art. 13(2)", _soft_opt_in),
    Rule("FR_B2B_PROFESSIONAL_RELEVANCE", "CNIL B2B doctrine; SAN-2020-018", _b2b),
    Rule("FR_GENERIC_ROLE_ADDRESS", "CNIL; RFC 2142", _role),
    Rule("FR_PARTNER_TRANSFER_CONSENT", "CNIL 28 Dec 2018; SAN-2025-002", _partner),
    Rule("FR_PROSPECT_RETENTION_3Y", "CNIL référentiel 2022; SAN-2020-008", _retention),
    Rule("GDPR_ART14_NOTICE_FIRST_CONTACT", "GDPR art. 14(2)(f), 14(3)", _art14),
    Rule("GDPR_ART7_CONSENT_PROOF", "GDPR art. 7(1)", _art7),
)

RULES_BY_ID: dict[str, Rule] = {r.rule_id: r for r in RULES}


def decide(prospect: Prospect, campaign: Campaign, facts: Facts, now: datetime) -> Decision:
    """Apply every rule and return the decision.

    Args:
        prospect: the recipient and their facts.
        campaign: the campaign (step) being sent.
        facts: what the store and classifier found (see :class:`Facts`).
        now: the current time, timezone-aware.

    Returns:
        A :class:`~prospect_mailer.models.Decision`; ``blocked_by`` lists every failed rule.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    ctx = _Ctx(
        prospect=prospect,
        campaign=campaign,
        facts=facts,
        now=now,
        rtype=effective_recipient_type(prospect, facts),
        prospecting=campaign.purpose != "transactional",
    )
    results = tuple(rule.check(ctx) for rule in RULES)
    return trusted(  # not validated: see _result
        Decision,
        {
            "allowed": not any(r.outcome == "fail" for r in results),
            "results": results,
            "effective_recipient_type": ctx.rtype,
            "first_contact": not facts.prior_contact,
        },
    )


def explain(decision: Decision) -> str:
    """One line per failed rule: ``RULE_ID: reason``."""
    return "\n".join(f"{r.rule_id}: {r.reason}" for r in decision.results if r.outcome == "fail")
