"""Test data shared by the end-to-end tests: one advertiser, one campaign, allowed prospects."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prospect_mailer.compliance import FooterContext
from prospect_mailer.models import Advertiser, Campaign, Prospect

KEY = "test-signing-key-0123456789abcdef"
BASE = "https://optout.acme.example"
MAILTO_DOMAIN = "optout.acme.example"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

ADVERTISER = Advertiser(
    id="acme",
    legal_name="ACME SAS",
    postal_address="1 rue de la Paix, 75002 Paris",
    contact="dpo@acme.example",
)

CAMPAIGN = Campaign(
    id="spring",
    purpose="prospecting",
    subject="Capteurs connectés",
    from_address="ventes@acme.example",
    from_name="ACME Ventes",
    advertiser=ADVERTISER,
    category="sensors",
    target_functions=("CTO",),
    text_template="Bonjour {{ prospect.name }},\nNos capteurs.\n",
    html_template="<html><body><p>Bonjour {{ prospect.name }}</p></body></html>",
)


def b2b(email_addr: str, **kw: Any) -> Prospect:
    """A professional prospect every rule allows for :data:`CAMPAIGN`."""
    base: dict[str, Any] = dict(
        email=email_addr,
        name="Marie Curie",
        recipient_type="professional",
        legal_basis="legitimate_interest",
        source_type="public",
        source_name="Annuaire des entreprises",
        collection_method="annuaire professionnel",
        job_function="CTO",
        optout_offered_at_collection=True,
        collected_at=datetime(2026, 10, 1, tzinfo=UTC),
    )
    base.update(kw)
    return Prospect(**base)


FOOTER_URL = "https://optout.acme.example/unsubscribe/" + "t" * 150
FOOTER_MAILTO = "mailto:unsubscribe+abcdefghijklmnopqrstuvwxyz234567@optout.acme.example"


def footer_context(**changes: Any) -> FooterContext:
    """The footer context the MIME tests render (a French first contact, both links)."""
    base: dict[str, Any] = dict(
        locale="fr",
        advertiser_legal_name="Dupont & Fils <SARL>",
        advertiser_postal_address="1 rue de la Paix\n75002 Paris",
        advertiser_contact="dpo@dupont.example",
        unsubscribe_url=FOOTER_URL,
        unsubscribe_mailto=FOOTER_MAILTO,
        source_name="Annuaire des entreprises",
        source_type="public",
        collection_method="annuaire",
        collected_at=date(2026, 10, 1),
        first_contact=True,
        campaign_id="c1",
    )
    base.update(changes)
    return FooterContext(**base)
