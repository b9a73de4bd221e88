"""The pure policy: every rule id has an allowing and a blocking case, plus properties."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prospect_mailer.models import Advertiser, Campaign, Decision, Prospect, RuleResult, trusted
from prospect_mailer.policy import RULES, Facts, SuppressionMatch, decide, explain, stable_until

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ADV = Advertiser(
    id="acme",
    legal_name="ACME SAS",
    postal_address="1 rue de la Paix, 75002 Paris",
    contact="dpo@acme.example",
)


def campaign(**kw: Any) -> Campaign:
    base: dict[str, Any] = dict(
        id="spring-2026",
        purpose="prospecting",
        subject="Nos nouveaux capteurs",
        from_address="ventes@acme.example",
        from_name="ACME Ventes",
        advertiser=ADV,
        category="sensors",
        target_functions=("CTO", "Head of IT"),
        text_template="Bonjour {{ prospect.name }}",
    )
    base.update(kw)
    return Campaign(**base)


def b2c(**kw: Any) -> Prospect:
    base: dict[str, Any] = dict(
        email="jean.dupont@example.fr",
        recipient_type="individual",
        legal_basis="consent",
        consent_ref="form-v3#123",
        consent_at=datetime(2026, 1, 5, tzinfo=UTC),
        source_type="direct",
        collected_at=datetime(2026, 1, 5, tzinfo=UTC),
    )
    base.update(kw)
    return Prospect(**base)


def b2b(**kw: Any) -> Prospect:
    base: dict[str, Any] = dict(
        email="marie.curie@bigcorp.example",
        recipient_type="professional",
        legal_basis="legitimate_interest",
        source_type="direct",
        job_function="CTO",
        optout_offered_at_collection=True,
        collected_at=datetime(2025, 6, 1, tzinfo=UTC),
    )
    base.update(kw)
    return Prospect(**base)


def blocked(p: Prospect, c: Campaign | None = None, facts: Facts | None = None) -> tuple[str, ...]:
    return decide(p, c or campaign(), facts or Facts(), NOW).blocked_by


def outcome(p: Prospect, rule_id: str, c: Campaign | None = None, f: Facts | None = None) -> str:
    d = decide(p, c or campaign(), f or Facts(), NOW)
    return next(r.outcome for r in d.results if r.rule_id == rule_id)


def test_every_rule_has_a_legal_source_and_unique_id() -> None:
    ids = [r.rule_id for r in RULES]
    assert len(ids) == len(set(ids))
    assert all(r.source for r in RULES)


def test_baseline_prospects_are_allowed() -> None:
    assert blocked(b2c()) == ()
    assert blocked(b2b()) == ()


# FR_SCOPE_DIRECT_PROSPECTING
def test_scope_missing_purpose_blocks() -> None:
    assert blocked(b2c(), campaign(purpose=None)) == ("FR_SCOPE_DIRECT_PROSPECTING",)


def test_scope_transactional_skips_prospecting_rules() -> None:
    p = b2c(legal_basis=None, consent_ref=None)
    assert "FR_B2C_CONSENT_REQUIRED" in blocked(p)
    assert blocked(p, campaign(purpose="transactional")) == ()


# SUPP_CHECK_AT_SEND
@pytest.mark.parametrize(
    ("scope", "value", "blocks"),
    [
        ("global", "", True),
        ("advertiser", "acme", True),
        ("advertiser", "other-brand", False),
        ("campaign", "spring-2026", True),
        ("campaign", "sensors", True),  # topic = campaign category
        ("campaign", "autumn", False),
    ],
)
def test_suppression_scopes(scope: str, value: str, blocks: bool) -> None:
    facts = Facts(suppression=(SuppressionMatch("address", scope, value, "unsubscribe"),))
    assert ("SUPP_CHECK_AT_SEND" in blocked(b2c(), facts=facts)) is blocks


def test_suppression_blocks_even_transactional_and_role_addresses() -> None:
    facts = Facts(
        suppression=(SuppressionMatch("domain", "global", "", "manual"),), role_address=True
    )
    p = b2b(email="contact@bigcorp.example", recipient_type="generic_role")
    assert blocked(p, facts=facts) == ("SUPP_CHECK_AT_SEND",)
    assert blocked(p, campaign(purpose="transactional"), facts) == ("SUPP_CHECK_AT_SEND",)


# FR_SENDER_IDENTITY
@pytest.mark.parametrize("field", ["legal_name", "postal_address", "contact"])
def test_identity_requires_advertiser_details(field: str) -> None:
    adv = ADV.model_copy(update={field: "  "})
    d = decide(b2c(), campaign(advertiser=adv), Facts(), NOW)
    assert d.blocked_by == ("FR_SENDER_IDENTITY",)
    assert f"advertiser.{field}" in explain(d)


def test_identity_requires_from_name() -> None:
    assert blocked(b2c(), campaign(from_name="")) == ("FR_SENDER_IDENTITY",)


# FR_B2C_CONSENT_REQUIRED / GDPR_ART7_CONSENT_PROOF
def test_individual_without_consent_blocked() -> None:
    p = b2c(legal_basis="legitimate_interest", consent_ref=None)
    assert blocked(p) == ("FR_B2C_CONSENT_REQUIRED",)


def test_unknown_type_non_role_is_individual() -> None:
    p = b2b(recipient_type=None)  # legitimate interest, looks like a person
    assert blocked(p) == ("FR_B2C_CONSENT_REQUIRED",)


def test_withdrawn_consent_blocks() -> None:
    p = b2c(consent_withdrawn_at=NOW - timedelta(days=1))
    assert blocked(p) == ("FR_B2C_CONSENT_REQUIRED",)
    assert blocked(b2c(consent_withdrawn_at=NOW + timedelta(days=1))) == ()


def test_consent_for_other_advertiser_blocks() -> None:
    assert blocked(b2c(consent_advertisers=("other",))) == ("FR_B2C_CONSENT_REQUIRED",)
    assert blocked(b2c(collecting_entity="other")) == ("FR_B2C_CONSENT_REQUIRED",)
    assert blocked(b2c(consent_advertisers=("other", "acme"))) == ()


def test_consent_without_ref_blocks_both_rules() -> None:
    assert blocked(b2c(consent_ref=None)) == ("FR_B2C_CONSENT_REQUIRED", "GDPR_ART7_CONSENT_PROOF")


def test_consent_without_date_cannot_be_proven() -> None:
    assert blocked(b2c(consent_at=None)) == ("GDPR_ART7_CONSENT_PROOF",)
    assert outcome(b2b(), "GDPR_ART7_CONSENT_PROOF") == "not_applicable"


# FR_B2C_SOFT_OPT_IN
def soft(**kw: Any) -> Prospect:
    base: dict[str, Any] = dict(
        legal_basis="soft_opt_in",
        consent_ref=None,
        consent_at=None,
        customer_since=date(2025, 3, 1),
        sale_ref="INV-2025-0042",
        collecting_entity="acme",
        optout_offered_at_collection=True,
        purchased_categories=("sensors",),
    )
    base.update(kw)
    return b2c(**base)


def test_soft_opt_in_allowed() -> None:
    assert blocked(soft()) == ()
    assert outcome(soft(), "FR_B2C_SOFT_OPT_IN") == "pass"


@pytest.mark.parametrize(
    "change",
    [
        {"customer_since": None},
        {"sale_ref": None},
        {"collecting_entity": "acme-group-sister"},
        {"optout_offered_at_collection": False},
        {"purchased_categories": ("furniture",)},
    ],
)
def test_soft_opt_in_each_condition_required(change: dict[str, Any]) -> None:
    assert blocked(soft(**change)) == ("FR_B2C_CONSENT_REQUIRED", "FR_B2C_SOFT_OPT_IN")


def test_soft_opt_in_analogous_category() -> None:
    p = soft(purchased_categories=("thermometers",))
    assert blocked(p) != ()
    assert blocked(p, campaign(analogous_categories=("thermometers",))) == ()


# FR_B2B_PROFESSIONAL_RELEVANCE
def test_b2b_job_relevance_case_insensitive() -> None:
    assert blocked(b2b(job_function="cto")) == ()


def test_b2b_not_relevant_blocks_with_consent_fallback_listed() -> None:
    assert blocked(b2b(job_function="Chef")) == (
        "FR_B2C_CONSENT_REQUIRED",
        "FR_B2B_PROFESSIONAL_RELEVANCE",
    )
    assert blocked(b2b(job_function=None)) == (
        "FR_B2C_CONSENT_REQUIRED",
        "FR_B2B_PROFESSIONAL_RELEVANCE",
    )


def test_b2b_not_informed_at_collection_blocks() -> None:
    assert "FR_B2B_PROFESSIONAL_RELEVANCE" in blocked(b2b(optout_offered_at_collection=None))


def test_b2b_not_relevant_but_consented_is_allowed() -> None:
    p = b2b(
        job_function="Chef",
        legal_basis="consent",
        consent_ref="c1",
        consent_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert blocked(p) == ()


# FR_GENERIC_ROLE_ADDRESS
def test_role_address_needs_no_consent() -> None:
    p = b2b(email="contact@bigcorp.example", recipient_type=None, legal_basis=None)
    assert blocked(p, facts=Facts(role_address=True)) == ()
    assert outcome(p, "FR_GENERIC_ROLE_ADDRESS", f=Facts(role_address=True)) == "pass"


def test_declared_role_not_confirmed_is_treated_as_individual() -> None:
    p = b2b(email="jean@bigcorp.example", recipient_type="generic_role", legal_basis=None)
    assert blocked(p, facts=Facts(role_address=False)) == ("FR_B2C_CONSENT_REQUIRED",)
    assert outcome(p, "FR_GENERIC_ROLE_ADDRESS") == "warn"


def test_role_address_never_relaxes_identity() -> None:
    p = b2b(email="contact@bigcorp.example", recipient_type="generic_role")
    c = campaign(advertiser=ADV.model_copy(update={"postal_address": ""}))
    assert blocked(p, c, Facts(role_address=True)) == ("FR_SENDER_IDENTITY",)


# FR_PROSPECT_RETENTION_3Y
def test_retention_expired_blocks() -> None:
    old = datetime(2023, 11, 27, tzinfo=UTC)
    assert blocked(b2b(collected_at=old)) == ("FR_PROSPECT_RETENTION_3Y",)


def test_retention_counts_from_last_prospect_activity() -> None:
    old = datetime(2022, 1, 1, tzinfo=UTC)
    assert blocked(b2b(collected_at=old, last_activity_at=NOW - timedelta(days=10))) == ()


def test_retention_unknown_collection_date_blocks() -> None:
    assert blocked(b2b(collected_at=None)) == ("FR_PROSPECT_RETENTION_3Y",)


def test_retention_current_customer_ok_and_former_customer_counts_from_end() -> None:
    old = datetime(2019, 1, 1, tzinfo=UTC)
    assert blocked(b2b(collected_at=old, customer_since=date(2019, 1, 1))) == ()
    ended = b2b(collected_at=old, customer_since=date(2019, 1, 1), customer_until=date(2022, 1, 1))
    assert blocked(ended) == ("FR_PROSPECT_RETENTION_3Y",)


def test_retention_one_repermission_message() -> None:
    p = b2b(collected_at=datetime(2020, 1, 1, tzinfo=UTC))
    c = campaign(repermission=True)
    assert blocked(p, c) == ()
    assert blocked(p, c, Facts(repermission_already_sent=True)) == ("FR_PROSPECT_RETENTION_3Y",)


def test_retention_leap_day() -> None:
    p = b2b(collected_at=datetime(2024, 2, 29, tzinfo=UTC))
    assert decide(p, campaign(), Facts(), datetime(2027, 2, 28, tzinfo=UTC)).allowed
    assert not decide(p, campaign(), Facts(), datetime(2027, 3, 1, tzinfo=UTC)).allowed


# FR_PARTNER_TRANSFER_CONSENT
def partner_b2c(**kw: Any) -> Prospect:
    base: dict[str, Any] = dict(
        source_type="partner",
        source_name="LeadsFrance SARL",
        collecting_entity="leadsfrance",
        consent_advertisers=("acme", "globex"),
        transfer_hops=1,
    )
    base.update(kw)
    return b2c(**base)


def test_partner_b2c_with_advertiser_in_list_allowed() -> None:
    assert blocked(partner_b2c()) == ()


def test_partner_b2c_not_in_list_blocked() -> None:
    assert blocked(partner_b2c(consent_advertisers=("globex",))) == (
        "FR_B2C_CONSENT_REQUIRED",
        "FR_PARTNER_TRANSFER_CONSENT",
    )
    # an empty partner list never covers a partner-sourced record
    assert "FR_PARTNER_TRANSFER_CONSENT" in blocked(partner_b2c(consent_advertisers=()))


def test_partner_onward_transfer_blocked() -> None:
    assert blocked(partner_b2c(transfer_hops=2)) == ("FR_PARTNER_TRANSFER_CONSENT",)


def test_partner_b2b_requires_information_at_collection() -> None:
    p = b2b(source_type="broker", source_name="DataPro")
    assert blocked(p) == ()
    assert blocked(b2b(source_type="broker", source_name="DataPro",
                       optout_offered_at_collection=False)) == (
        "FR_B2C_CONSENT_REQUIRED",
        "FR_B2B_PROFESSIONAL_RELEVANCE",
        "FR_PARTNER_TRANSFER_CONSENT",
    )  # fmt: skip


# GDPR_ART14_NOTICE_FIRST_CONTACT
def test_art14_indirect_needs_source_name() -> None:
    assert blocked(b2b(source_type="public", source_name=None)) == (
        "GDPR_ART14_NOTICE_FIRST_CONTACT",
    )
    assert blocked(b2b(source_type="public", source_name="Annuaire des entreprises")) == ()


def test_art14_unknown_origin_blocks() -> None:
    assert blocked(b2b(source_type=None)) == ("GDPR_ART14_NOTICE_FIRST_CONTACT",)


def test_art14_late_first_notice_is_a_warning() -> None:
    p = b2b(source_type="public", source_name="Annuaire", collected_at=NOW - timedelta(days=90))
    d = decide(p, campaign(), Facts(prior_contact=False), NOW)
    assert d.allowed
    assert d.first_contact
    assert [w.rule_id for w in d.warnings] == ["GDPR_ART14_NOTICE_FIRST_CONTACT"]
    assert not decide(p, campaign(), Facts(prior_contact=True), NOW).warnings


def test_decision_lists_every_failed_rule() -> None:
    p = b2c(legal_basis=None, consent_ref=None, source_type=None, collected_at=None)
    facts = Facts(suppression=(SuppressionMatch("address", "global", "", "complaint"),))
    d = decide(p, campaign(from_name=""), facts, NOW)
    assert d.blocked_by == (
        "SUPP_CHECK_AT_SEND",
        "FR_SENDER_IDENTITY",
        "FR_B2C_CONSENT_REQUIRED",
        "FR_PROSPECT_RETENTION_3Y",
        "GDPR_ART14_NOTICE_FIRST_CONTACT",
    )


def test_naive_now_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(b2c(), campaign(), Facts(), datetime(2026, 1, 1))


# -- properties ---------------------------------------------------------------------------------

opt = st.none() | st.text(min_size=1, max_size=8, alphabet="abcdefgh")
dates = st.none() | st.datetimes(
    min_value=datetime(2015, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)
prospects = st.builds(
    Prospect,
    email=st.sampled_from(["a@x.example", "contact@corp.example", "b.c@gmail.com"]),
    recipient_type=st.none() | st.sampled_from(["individual", "professional", "generic_role"]),
    legal_basis=st.none() | st.sampled_from(["consent", "soft_opt_in", "legitimate_interest"]),
    consent_ref=opt,
    consent_at=dates,
    consent_withdrawn_at=dates,
    consent_advertisers=st.lists(st.sampled_from(["acme", "other"]), max_size=2).map(tuple),
    source_type=st.none() | st.sampled_from(["direct", "partner", "broker", "public"]),
    source_name=opt,
    collecting_entity=st.none() | st.sampled_from(["acme", "other"]),
    optout_offered_at_collection=st.none() | st.booleans(),
    transfer_hops=st.integers(0, 3),
    collected_at=dates,
    last_activity_at=dates,
    customer_since=st.none() | st.dates(min_value=date(2015, 1, 1), max_value=date(2026, 1, 1)),
    sale_ref=opt,
    purchased_categories=st.lists(st.sampled_from(["sensors", "x"]), max_size=2).map(tuple),
    job_function=st.none() | st.sampled_from(["CTO", "cook"]),
)
matches = st.builds(
    SuppressionMatch,
    kind=st.sampled_from(["address", "domain"]),
    scope=st.just("global") | st.just("advertiser"),
    scope_value=st.just("acme"),
    reason=st.sampled_from(["unsubscribe", "complaint", "manual"]),
).map(lambda m: SuppressionMatch(m.kind, m.scope, "" if m.scope == "global" else "acme", m.reason))


@given(p=prospects, m=matches, role=st.booleans(), purpose=st.sampled_from(["prospecting", None]))
def test_property_suppressed_address_never_allowed(
    p: Prospect, m: SuppressionMatch, role: bool, purpose: Any
) -> None:
    d = decide(p, campaign(purpose=purpose), Facts(suppression=(m,), role_address=role), NOW)
    assert not d.allowed
    assert "SUPP_CHECK_AT_SEND" in d.blocked_by


@given(p=prospects, role=st.booleans(), prior=st.booleans())
def test_property_decision_is_consistent(p: Prospect, role: bool, prior: bool) -> None:
    d = decide(p, campaign(), Facts(role_address=role, prior_contact=prior), NOW)
    assert d.allowed == (d.blocked_by == ())
    assert [r.rule_id for r in d.results] == [r.rule_id for r in RULES]
    assert all(r.reason for r in d.results if r.outcome == "fail")
    # an individual (effective type) is only allowed with consent or full soft opt-in
    if d.allowed and d.effective_recipient_type == "individual":
        assert p.legal_basis in ("consent", "soft_opt_in")
    # The policy builds its results without pydantic's validation (speed): validating them
    # must change nothing, down to the whitespace of a reason.
    assert Decision.model_validate(d.model_dump()) == d
    for r in d.results:
        assert RuleResult.model_validate(r.model_dump()).model_dump() == r.model_dump()


def test_prospect_name_with_line_break_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="name"):
        b2c(name="Jean\r\nBcc: victim@x.example")


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (RuleResult, {"rule_id": "FR_SCOPE_DIRECT_PROSPECTING", "outcome": "warn", "reason": "r"}),
        (
            Decision,
            {
                "allowed": False,
                "results": (RuleResult(rule_id="X", outcome="fail", reason="why"),),
                "effective_recipient_type": "professional",
                "first_contact": True,
            },
        ),
    ],
)
def test_trusted_models_are_what_model_construct_builds(
    cls: type[RuleResult | Decision], values: dict[str, object]
) -> None:
    fast = trusted(cls, dict(values))
    slow = cls.model_construct(**values)  # type: ignore[arg-type]
    assert type(fast) is cls
    assert fast == slow
    assert hash(fast) == hash(slow)
    assert repr(fast) == repr(slow)
    assert fast.model_fields_set == slow.model_fields_set == set(values)
    assert fast.model_dump() == slow.model_dump()
    assert fast.__pydantic_extra__ is None
    assert fast.__pydantic_private__ is None
    with pytest.raises(ValidationError):  # still frozen
        fast.__setattr__(next(iter(values)), None)


@settings(max_examples=1500, deadline=None)
@given(
    p=prospects,
    until_day=st.none() | st.dates(min_value=date(2015, 1, 1), max_value=date(2030, 1, 1)),
    prior=st.booleans(),
    t1=st.datetimes(
        min_value=datetime(2015, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    step=st.floats(min_value=0, max_value=1),
)
def test_property_decision_stable_until(
    p: Prospect, until_day: date | None, prior: bool, t1: datetime, step: float
) -> None:
    """decide() gives the same decision at any time in [t1, stable_until(p, t1)), the one
    just before the end included; a decision memo may keep it that long."""
    p = p.model_copy(update={"customer_until": until_day})
    facts = Facts(prior_contact=prior)
    first = decide(p, campaign(), facts, t1)
    end = stable_until(p, t1)
    if end is None:
        later = [t1 + timedelta(days=365 * 20 * step), t1 + timedelta(days=3650)]
    else:
        assert end >= t1
        if end == t1:
            return
        last = end - timedelta(microseconds=1)
        later = [t1 + (last - t1) * step, last]
    for t2 in later:
        assert decide(p, campaign(), facts, t2) == first, t2
