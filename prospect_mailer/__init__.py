"""prospect-mailer: send commercial-prospecting email with CNIL/GDPR rules enforced at send time.

Quick start::

    import asyncio
    from prospect_mailer import ProspectMailer, load_campaign, iter_prospects

    async def main() -> None:
        campaign = load_campaign("examples/campaign.toml")
        async with await ProspectMailer.from_settings() as mailer:
            summary = await mailer.send_many(iter_prospects("examples/prospects.csv"), campaign)
        print(summary.counts)

    asyncio.run(main())
"""

from .addresses import NormalisedAddress, RoleClassifier, normalise
from .compliance import FooterContext, FooterRenderer, apply_compliance
from .config import Settings, load_settings
from .errors import (
    ConfigError,
    DataFileError,
    InvalidAddressError,
    InvalidInputError,
    InvalidMessageError,
    ProspectMailerError,
    StoreError,
    TokenError,
    TransportError,
    TransportPermanentError,
    TransportTemporaryError,
)
from .files import iter_prospects, load_campaign, load_prospects
from .mailer import ProspectMailer, SendSummary
from .models import Advertiser, Campaign, Decision, Outcome, Prospect, RuleResult
from .policy import Facts, SuppressionMatch, decide
from .store import Store
from .tokens import TokenSigner, UnsubscribeToken
from .transport import Delivery, MemoryTransport, OutboxTransport, SMTPTransport, Transport

__version__ = "0.1.0"

__all__ = [
    "Advertiser",
    "Campaign",
    "ConfigError",
    "DataFileError",
    "Decision",
    "Delivery",
    "Facts",
    "FooterContext",
    "FooterRenderer",
    "InvalidAddressError",
    "InvalidInputError",
    "InvalidMessageError",
    "MemoryTransport",
    "NormalisedAddress",
    "OutboxTransport",
    "Outcome",
    "Prospect",
    "ProspectMailer",
    "ProspectMailerError",
    "RoleClassifier",
    "RuleResult",
    "SMTPTransport",
    "SendSummary",
    "Settings",
    "Store",
    "StoreError",
    "SuppressionMatch",
    "TokenError",
    "TokenSigner",
    "Transport",
    "TransportError",
    "TransportPermanentError",
    "TransportTemporaryError",
    "UnsubscribeToken",
    "__version__",
    "apply_compliance",
    "decide",
    "iter_prospects",
    "load_campaign",
    "load_prospects",
    "load_settings",
    "normalise",
]
