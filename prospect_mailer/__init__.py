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
from .inbound import InboundResult, handle_inbound
from .mailer import ProspectMailer, SendSummary
from .models import Advertiser, Campaign, Decision, Outcome, Prospect, RuleResult
from .optout import OptOutResult, OptOutService
from .policy import Facts, SuppressionMatch, decide
from .relay import RelayServer
from .store import Store
from .tokens import TokenSigner, UnsubscribeToken
from .transport import Delivery, MemoryTransport, OutboxTransport, SMTPTransport, Transport
from .web import create_app

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
    "InboundResult",
    "InvalidAddressError",
    "InvalidInputError",
    "InvalidMessageError",
    "MemoryTransport",
    "NormalisedAddress",
    "OptOutResult",
    "OptOutService",
    "OutboxTransport",
    "Outcome",
    "Prospect",
    "ProspectMailer",
    "ProspectMailerError",
    "RelayServer",
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
    "create_app",
    "decide",
    "handle_inbound",
    "iter_prospects",
    "load_campaign",
    "load_prospects",
    "load_settings",
    "normalise",
]
