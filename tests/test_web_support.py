"""Helpers shared by the unsubscribe tests (web, inbound, browser): a real send to object to.

Every token these tests use comes from a message the library actually composed: the
List-Unsubscribe header (HTTPS and mailto) and the VERP envelope sender.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
from factories import BASE, CAMPAIGN, KEY, MAILTO_DOMAIN, NOW, b2b

from prospect_mailer.mailer import ProspectMailer
from prospect_mailer.models import Campaign, Outcome
from prospect_mailer.optout import OptOutService
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import MemoryTransport

BOUNCE_DOMAIN = "bounces.acme.example"
#: The recipient the unsubscribe tests object for.
ADDR = "marie.curie@radium.example"


def make_mailer(store: Store, transport: MemoryTransport, **kw: Any) -> ProspectMailer:
    """A mailer with VERP bounces and a mailto unsubscribe address."""
    options: dict[str, Any] = dict(
        base_url=BASE, mailto_domain=MAILTO_DOMAIN, bounce_domain=BOUNCE_DOMAIN
    )
    options.update(kw)
    return ProspectMailer(
        store=store,
        transport=transport,
        signer=TokenSigner([KEY]),
        clock=lambda: NOW,
        **options,
    )


def make_optout(store: Store, **kw: Any) -> OptOutService:
    """The objection service over the same store and key as :func:`make_mailer`."""
    return OptOutService(store, TokenSigner([KEY]), **kw)


@dataclass(frozen=True)
class Sent:
    """One message the library sent, and the ways to object that it carries."""

    outcome: Outcome
    message: EmailMessage
    url: str  # the HTTPS one-click URL
    token: str  # its token
    mailto: str  # unsubscribe+TOKEN@domain
    verp: str  # bounce+TOKEN@domain (the envelope sender)


_LIST_UNSUB = re.compile(
    r"<(https://[^/>]+/unsubscribe/([^>]+))>, <mailto:(unsubscribe\+[a-z2-7]+@[^>]+)>"
)


async def send_one(
    mailer: ProspectMailer, transport: MemoryTransport, address: str, campaign: Campaign = CAMPAIGN
) -> Sent:
    """Send one message with the library and read its unsubscribe coordinates."""
    outcome = await mailer.send(b2b(address), campaign)
    assert outcome.status == "sent", outcome
    sent = transport.sent[-1]
    m = _LIST_UNSUB.fullmatch(str(sent.message["List-Unsubscribe"]))
    assert m, sent.message["List-Unsubscribe"]
    assert sent.sender.startswith("bounce+")
    return Sent(outcome, sent.message, m.group(1), m.group(2), m.group(3), sent.sender)


async def is_blocked(mailer: ProspectMailer, address: str, campaign: Campaign = CAMPAIGN) -> bool:
    """Whether a new send (a later campaign step, ``force``) to ``address`` is refused now."""
    outcome = await mailer.send(b2b(address), campaign, force=True)
    assert outcome.status in ("sent", "blocked"), outcome
    return outcome.status == "blocked"


@pytest.fixture
async def sent(db: Store) -> AsyncIterator[tuple[Sent, MemoryTransport]]:
    """One message sent to :data:`ADDR` (its unsubscribe coordinates), and the transport."""
    transport = MemoryTransport()
    mailer = make_mailer(db, transport)
    yield await send_one(mailer, transport, ADDR), transport
    await mailer.close()
