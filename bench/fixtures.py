"""The campaign and prospects every benchmark sends to (one definition for all scripts)."""

from __future__ import annotations

from datetime import UTC, datetime

from prospect_mailer import Advertiser, Campaign, Prospect

ADVERTISER = Advertiser(
    id="acme",
    legal_name="ACME SAS",
    postal_address="1 rue de la Paix, 75002 Paris",
    contact="dpo@acme.example",
)


def bench_campaign(campaign_id: str, text: str, html: str | None = None) -> Campaign:
    """A prospecting campaign of ACME's with these body templates."""
    return Campaign(
        id=campaign_id,
        purpose="prospecting",
        subject="Capteurs connectés",
        from_address="ventes@acme.example",
        from_name="ACME Ventes",
        advertiser=ADVERTISER,
        category="sensors",
        target_functions=("CTO",),
        text_template=text,
        html_template=html,
    )


def bench_prospect(email: str) -> Prospect:
    """A professional prospect every rule allows for :func:`bench_campaign`."""
    return Prospect(
        email=email,
        recipient_type="professional",
        legal_basis="legitimate_interest",
        source_type="public",
        source_name="Annuaire des entreprises",
        job_function="CTO",
        optout_offered_at_collection=True,
        collected_at=datetime(2026, 10, 1, tzinfo=UTC),
    )
