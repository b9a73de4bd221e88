"""Composition of one message: token, unsubscribe URIs, footers, and the MIME itself.

Templated campaign mail is written directly as wire bytes (:mod:`prospect_mailer.fastmime`);
a message handed in by a caller (the relay) goes through the compliance step
(:func:`~prospect_mailer.compliance.apply_compliance`). Either way every text and HTML part
carries both footers and the RFC 8058 headers: the caller cannot skip this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from .addresses import NormalisedAddress, normalise_recent
from .compliance import FooterContext, FooterRenderer, apply_compliance
from .fastmime import compose_bytes
from .mime import parse_message
from .models import Campaign, Decision, Prospect
from .rawmime import RawHeaders, apply_compliance_bytes
from .tokens import TokenSigner, UnsubscribeToken
from .transport import wire_bytes

__all__ = ["Composer", "RawMessage", "footer_context", "prepare_relay_message"]

#: Headers a client adds for the relay (``X-Prospect-Campaign``...): never for the recipient.
RELAY_HEADER_PREFIX = "x-prospect-"


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A caller's message as the wire bytes it arrived in (the relay's DATA, CRLF lines).

    Composed on the byte level when its shape allows (:mod:`prospect_mailer.rawmime`), else
    through the email package (:meth:`parsed`); either way ``X-Prospect-*`` headers are dropped
    and ``message_id`` is added when the message has none.

    Attributes:
        data: the message.
        message_id: the Message-ID to add if the message has none, or ``None``.
        headers: what :func:`~prospect_mailer.rawmime.scan_headers` read of ``data``, if the
            caller has it (the relay): the header block is then not read again.
    """

    data: bytes
    message_id: str | None = None
    headers: RawHeaders | None = None

    def parsed(self) -> EmailMessage:
        """The message parsed by the email package, with the same header changes.

        Raises:
            InvalidMessageError: the message cannot be processed safely.
        """
        return prepare_relay_message(parse_message(self.data), self.message_id)


def prepare_relay_message(message: EmailMessage, message_id: str | None) -> EmailMessage:
    """The relay's header changes, in place: ``X-Prospect-*`` removed (relay metadata, never
    for the recipient), and ``message_id`` set when the message has none or an empty one."""
    for name in {k for k in message if k.lower().startswith(RELAY_HEADER_PREFIX)}:
        del message[name]
    if message_id and not str(message.get("Message-ID", "")).strip():
        if "Message-ID" in message:
            message.replace_header("Message-ID", message_id)
        else:
            message["Message-ID"] = message_id
    return message


def footer_context(
    prospect: Prospect,
    campaign: Campaign,
    *,
    url: str,
    mailto: str | None,
    first_contact: bool,
) -> FooterContext:
    """What the footers say for ``prospect`` in ``campaign`` (the one place it is built)."""
    collected: date | None = prospect.collected_at.date() if prospect.collected_at else None
    return FooterContext(
        locale=prospect.locale or campaign.locale,
        advertiser_legal_name=campaign.advertiser.legal_name,
        advertiser_postal_address=campaign.advertiser.postal_address,
        advertiser_contact=campaign.advertiser.contact,
        unsubscribe_url=url,
        unsubscribe_mailto=mailto,
        source_name=prospect.source_name,
        source_type=prospect.source_type,
        collection_method=prospect.collection_method,
        collected_at=collected,
        first_contact=first_contact,
        campaign_id=campaign.id,
        recipient_name=prospect.name,
    )


class Composer:
    """Builds each message of a send, with its unsubscribe token and footers.

    Args:
        signer: unsubscribe-token signer.
        base_url: public HTTPS base of the unsubscribe handler.
        mailto_domain: domain of the ``unsubscribe+TOKEN@`` address, or ``None``.
        bounce_domain: domain of the VERP envelope sender ``bounce+TOKEN@``, or ``None``.
        renderer: footer and body template renderer.
    """

    def __init__(
        self,
        *,
        signer: TokenSigner,
        base_url: str,
        mailto_domain: str | None,
        bounce_domain: str | None,
        renderer: FooterRenderer,
    ) -> None:
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self.mailto_domain = mailto_domain
        self.bounce_domain = bounce_domain
        self.renderer = renderer

    def unsubscribe_url(self, token: str) -> str:
        """The HTTPS one-click URL for a token."""
        return f"{self.base_url}/unsubscribe/{token}"

    def render_bodies(
        self, p: Prospect, campaign: Campaign, url: str, locale: str
    ) -> tuple[str | None, str | None]:
        """Render the campaign's text and HTML templates for one prospect."""
        context: dict[str, Any] = {
            "prospect": p,
            "campaign": campaign,
            "advertiser": campaign.advertiser,
            "unsubscribe_url": url,
            "locale": locale,
        }
        text = (
            self.renderer.render_string(campaign.text_template, context, html=False)
            if campaign.text_template
            else None
        )
        html = (
            self.renderer.render_string(campaign.html_template, context, html=True)
            if campaign.html_template
            else None
        )
        return text, html

    def envelope_sender(self, campaign: Campaign, send_id: str) -> str:
        """MAIL FROM for a send: a VERP ``bounce+TOKEN@`` address when a bounce domain is set.

        The token names the send, so a bounce or complaint received there resolves to the
        recipient without trusting anything in the bounce itself.
        """
        if self.bounce_domain:
            return f"bounce+{self.signer.make_short(send_id)}@{self.bounce_domain}"
        return campaign.from_address

    def compose(
        self,
        prospect: Prospect,
        address: NormalisedAddress,
        campaign: Campaign,
        decision: Decision,
        send_id: str,
        now: datetime,
        given: EmailMessage | RawMessage | None,
    ) -> tuple[EmailMessage | bytes, str, str, str]:
        p = prospect
        locale = p.locale or campaign.locale
        token = self.signer.make(
            UnsubscribeToken(
                recipient_hash=address.key_hash,
                advertiser_id=campaign.advertiser.id,
                campaign_id=campaign.id,
                scope="advertiser",
                locale=locale,
            )
        )
        url = self.unsubscribe_url(token)
        mailto = (
            f"mailto:unsubscribe+{self.signer.make_short(send_id)}@{self.mailto_domain}"
            if self.mailto_domain
            else None
        )
        from_domain = normalise_recent(campaign.from_address).domain
        footers = self.renderer.render(
            footer_context(
                p, campaign, url=url, mailto=mailto, first_contact=decision.first_contact
            )
        )
        token_id = self.signer.token_id(token)
        if isinstance(given, RawMessage):
            done = apply_compliance_bytes(
                given.data,
                footers,
                list_unsubscribe_url=url,
                list_unsubscribe_mailto=mailto,
                message_id_domain=from_domain,
                now=now,
                drop_header_prefix=RELAY_HEADER_PREFIX,
                add_message_id=given.message_id,
                from_display_name=campaign.from_name,
                from_address=campaign.from_address,
                headers=given.headers,
            )
            if done is not None:
                return done[0], done[1], token_id, footers.template_hash
            given = given.parsed()  # a shape the byte level leaves to the email package
        if given is not None:
            # Someone else's MIME (the relay): inject into every text part of a copy.
            final = apply_compliance(
                given,
                footers,
                list_unsubscribe_url=url,
                list_unsubscribe_mailto=mailto,
                message_id_domain=from_domain,
                now=now,
            )
            _name_the_sender(final, campaign)
            return final, str(final["Message-ID"]), token_id, footers.template_hash
        # Our own message: footers joined to the rendered bodies, MIME written once.
        text, html = self.render_bodies(p, campaign, url, locale)
        # Short enough never to be folded, and it names the send: a bounce quoting it leads
        # straight to the audit record.
        message_id = f"<{send_id}@{from_domain}>"
        data = compose_bytes(
            from_name=campaign.from_name,
            from_address=campaign.from_address,
            to_name=p.name or "",
            to_address=p.email,
            subject=campaign.subject,
            reply_to=campaign.reply_to,
            message_id=message_id,
            now=now,
            text=text,
            html=html,
            footers=footers,
            list_unsubscribe_url=url,
            list_unsubscribe_mailto=mailto,
        )
        return data, message_id, token_id, footers.template_hash

    def compose_wire(
        self,
        prospect: Prospect,
        address: NormalisedAddress,
        campaign: Campaign,
        decision: Decision,
        send_id: str,
        now: datetime,
        given: EmailMessage | RawMessage | None,
    ) -> tuple[bytes, str, str, str]:
        """:meth:`compose`, then serialised to wire bytes (for a worker thread)."""
        message, message_id, token_id, template_hash = self.compose(
            prospect, address, campaign, decision, send_id, now, given
        )
        return wire_bytes(message), message_id, token_id, template_hash


def _name_the_sender(msg: EmailMessage, campaign: Campaign) -> None:
    """FR_SENDER_IDENTITY: the From of a caller's message shows who the mail is from.

    A missing From becomes the campaign's; a bare address gets the campaign's display name.
    A From that already names someone is the caller's choice and is kept.
    """
    if "From" not in msg:
        msg["From"] = Address(display_name=campaign.from_name, addr_spec=campaign.from_address)
        return
    try:
        addresses = msg["From"].addresses
    except (AttributeError, ValueError, IndexError):
        return  # unparseable: left to the receiving side, as the caller sent it
    if len(addresses) == 1 and not addresses[0].display_name and campaign.from_name:
        msg.replace_header(
            "From", Address(display_name=campaign.from_name, addr_spec=addresses[0].addr_spec)
        )
