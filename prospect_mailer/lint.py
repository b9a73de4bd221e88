"""Campaign lint: what can be checked before the first message goes out.

Nothing here re-implements a rule: the purpose and identity checks are the policy's own rules
(:func:`prospect_mailer.policy.decide`), the footers come from the real
:class:`~prospect_mailer.compliance.FooterRenderer` and :func:`apply_compliance`, so a campaign
that lints clean composes the way a send composes it. The checks:

* ``purpose``: FR_SCOPE_DIRECT_PROSPECTING (the campaign declares prospecting/transactional);
* ``identity``: FR_SENDER_IDENTITY (legal name, postal address, contact, From display name),
  plus a warning when the postal address has no number (no street number or postcode);
* ``templates``: the body templates render for a sample prospect;
* ``footers``: every text and HTML part carries both footers (origin of the data, and the
  identity + opt-out block) after the compliance step;
* ``from_domain``: the From domain normalises (IDNA), is not reserved (``.example``,
  ``.invalid``...) and, for prospecting, not a consumer mailbox (warnings: deliverability and
  DMARC alignment, RULES.md section D);
* ``unsubscribe``: the base URL is HTTPS, not the placeholder, and ``GET {base}/healthz``
  answers 2xx (FR_OPTOUT_EVERY_MESSAGE: "the endpoint answers"); skipped when offline.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Literal
from urllib.parse import urlsplit

import httpx

from . import policy
from .addresses import FREEMAIL_DOMAINS, normalise
from .compliance import (
    HTML_OBJECTION_CLASS,
    HTML_OPTOUT_CLASS,
    HTML_ORIGIN_CLASS,
    TEXT_FOOTER_SEPARATOR,
    FooterRenderer,
    RenderedFooters,
    apply_compliance,
)
from .compose import footer_context
from .config import PLACEHOLDER_BASE_URL
from .errors import ProspectMailerError
from .mime import footable_parts
from .models import Campaign, Prospect

__all__ = [
    "CheckStatus",
    "LintCheck",
    "check_unsubscribe_endpoint",
    "lint_campaign",
    "sample_prospect",
]

CheckStatus = Literal["ok", "warn", "fail", "skipped"]
_RESERVED_TLDS = frozenset({"example", "invalid", "test", "localhost", "local"})


@dataclass(frozen=True, slots=True)
class LintCheck:
    """One check's result.

    Attributes:
        name: ``purpose``, ``identity``, ``templates``, ``footers``, ``from_domain``,
            ``unsubscribe``.
        status: ``ok``, ``warn`` (worth fixing, does not fail the lint), ``fail``, ``skipped``.
        message: what was found.
        rule_id: the RULES.md id behind the check, if any.
    """

    name: str
    status: CheckStatus
    message: str
    rule_id: str = ""


def sample_prospect(campaign: Campaign, now: datetime) -> Prospect:
    """A plausible prospect for rendering: a partner-sourced professional in the target."""
    return Prospect(
        email="camille.exemple@example.com",
        name="Camille Exemple",
        recipient_type="professional",
        legal_basis="legitimate_interest",
        source_type="partner",
        source_name="Exemple Annuaires",
        collection_method="salon professionnel",
        optout_offered_at_collection=True,
        collected_at=now - timedelta(days=10),
        job_function=campaign.target_functions[0] if campaign.target_functions else "CTO",
        locale=campaign.locale,
    )


def _policy_checks(campaign: Campaign, prospect: Prospect, now: datetime) -> list[LintCheck]:
    decision = policy.decide(prospect, campaign, policy.Facts(), now)
    by_id = {r.rule_id: r for r in decision.results}
    out = []
    for name, rid in (
        ("purpose", "FR_SCOPE_DIRECT_PROSPECTING"),
        ("identity", "FR_SENDER_IDENTITY"),
    ):
        r = by_id[rid]
        ok = r.outcome != "fail"
        out.append(LintCheck(name, "ok" if ok else "fail", r.reason or "complete", rid))
    address = campaign.advertiser.postal_address
    if address.strip() and not any(c.isdigit() for c in address):
        out.append(
            LintCheck(
                "identity",
                "warn",
                f"postal address {address!r} has no number: street number and postcode?",
                "FR_SENDER_IDENTITY",
            )
        )
    return out


def _body(
    renderer: FooterRenderer, campaign: Campaign, prospect: Prospect, url: str
) -> EmailMessage:
    # The same context and MIME structure as ProspectMailer._render (README "Files").
    context: dict[str, object] = {
        "prospect": prospect,
        "campaign": campaign,
        "advertiser": campaign.advertiser,
        "unsubscribe_url": url,
        "locale": prospect.locale or campaign.locale,
    }
    msg = EmailMessage()
    msg["Subject"] = campaign.subject
    msg["From"] = Address(display_name=campaign.from_name, addr_spec=campaign.from_address)
    msg["To"] = Address(display_name=prospect.name or "", addr_spec=prospect.email)
    text = html = None
    if campaign.text_template:
        text = renderer.render_string(campaign.text_template, context, html=False)
    if campaign.html_template:
        html = renderer.render_string(campaign.html_template, context, html=True)
    if text is not None:
        msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
        if html is not None:
            msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    elif html is not None:
        msg.set_content(html, subtype="html", charset="utf-8", cte="quoted-printable")
    return msg


def _footer_problems(msg: EmailMessage, footers: RenderedFooters, url: str) -> list[str]:
    lines = [ln for ln in footers.text.splitlines() if ln.strip()]
    origin_line, optout_line = lines[1], lines[-1]  # after the "-- " separator; last line
    problems = []
    for part in footable_parts(msg):
        ctype = part.get_content_type()
        content = str(part.get_content())
        if ctype == "text/html":
            needed = [f'class="{c}"' for c in (HTML_ORIGIN_CLASS, HTML_OBJECTION_CLASS)]
            needed += [f'class="{HTML_OPTOUT_CLASS}"', url]
        else:
            needed = [TEXT_FOOTER_SEPARATOR + "\n", origin_line, optout_line, url]
        missing = [n for n in needed if n not in content]
        if missing:
            problems.append(f"{ctype} part lacks {missing}")
    return problems


def _compose_checks(
    campaign: Campaign, renderer: FooterRenderer, prospect: Prospect, base_url: str, now: datetime
) -> list[LintCheck]:
    url = f"{base_url.rstrip('/')}/unsubscribe/LINT-SAMPLE-TOKEN"
    try:
        body = _body(renderer, campaign, prospect, url)
    except ProspectMailerError as exc:
        return [LintCheck("templates", "fail", str(exc))]
    parts = [p.get_content_type() for p in body.walk() if not p.is_multipart()]
    checks = [LintCheck("templates", "ok", f"rendered for a sample prospect: {', '.join(parts)}")]
    try:
        footers = renderer.render(
            footer_context(prospect, campaign, url=url, mailto=None, first_contact=True)
        )
        final = apply_compliance(
            body,
            footers,
            list_unsubscribe_url=url,
            list_unsubscribe_mailto=None,
            message_id_domain=normalise(campaign.from_address).domain,
            now=now,
        )
        problems = _footer_problems(final, footers, url)
    except ProspectMailerError as exc:
        return [*checks, LintCheck("footers", "fail", str(exc), "FR_OPTOUT_EVERY_MESSAGE")]
    if problems:
        return [
            *checks,
            LintCheck("footers", "fail", "; ".join(problems), "FR_OPTOUT_EVERY_MESSAGE"),
        ]
    message = f"origin and opt-out footers in every part ({len(footable_parts(final))})"
    return [*checks, LintCheck("footers", "ok", message, "FR_OPTOUT_EVERY_MESSAGE")]


def _from_domain(campaign: Campaign) -> list[LintCheck]:
    domain = normalise(campaign.from_address).domain
    tld = domain.rsplit(".", 1)[-1]
    if "." not in domain or tld in _RESERVED_TLDS:
        return [
            LintCheck("from_domain", "warn", f"{domain}: reserved or local name, not deliverable")
        ]
    if domain in FREEMAIL_DOMAINS and campaign.purpose != "transactional":
        return [
            LintCheck(
                "from_domain",
                "warn",
                f"{domain} is a consumer mailbox provider: prospecting from it cannot be "
                "DMARC-aligned and looks like spam; send from the advertiser's own domain",
                "GMAIL_SENDER_REQUIREMENTS",
            )
        ]
    return [LintCheck("from_domain", "ok", domain)]


def _base_url(base_url: str) -> LintCheck | None:
    parts = urlsplit(base_url)
    if parts.scheme != "https" or not parts.hostname:
        return LintCheck(
            "unsubscribe", "fail", f"{base_url} is not https://", "RFC8058_ONE_CLICK_HEADERS"
        )
    if base_url.rstrip("/") == PLACEHOLDER_BASE_URL:
        return LintCheck(
            "unsubscribe",
            "fail",
            f"{PLACEHOLDER_BASE_URL} is the placeholder: set PROSPECT_MAILER_BASE_URL",
            "FR_OPTOUT_EVERY_MESSAGE",
        )
    return None


def lint_campaign(
    campaign: Campaign,
    *,
    renderer: FooterRenderer,
    base_url: str,
    now: datetime | None = None,
    prospect: Prospect | None = None,
) -> list[LintCheck]:
    """Every offline check for ``campaign`` (see the module docs); never raises for findings.

    Args:
        campaign: the loaded campaign.
        renderer: the footer renderer the mailer would use (same template folders).
        base_url: the unsubscribe base URL the mailer would use.
        now: the current time (default now).
        prospect: the sample to render for (default :func:`sample_prospect`).
    """
    when = now or datetime.now(UTC)
    sample = prospect or sample_prospect(campaign, when)
    checks = _policy_checks(campaign, sample, when)
    checks += _compose_checks(campaign, renderer, sample, base_url, when)
    checks += _from_domain(campaign)
    url_problem = _base_url(base_url)
    checks.append(url_problem or LintCheck("unsubscribe", "ok", f"{base_url} is https"))
    return checks


async def check_unsubscribe_endpoint(
    base_url: str, *, request_timeout: float = 5.0, verify: ssl.SSLContext | bool = True
) -> LintCheck:
    """``GET {base_url}/healthz``: ``ok`` on 2xx, else ``fail`` saying what happened.

    Args:
        base_url: the unsubscribe base URL.
        request_timeout: seconds for the whole request.
        verify: TLS verification (an ``ssl.SSLContext`` for a private CA).
    """
    problem = _base_url(base_url)
    if problem is not None:
        return problem
    url = f"{base_url.rstrip('/')}/healthz"
    try:
        async with httpx.AsyncClient(timeout=request_timeout, verify=verify) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        return LintCheck(
            "unsubscribe", "fail", f"{url} did not answer: {reason}", "FR_OPTOUT_EVERY_MESSAGE"
        )
    if not response.is_success:
        return LintCheck(
            "unsubscribe",
            "fail",
            f"{url} answered {response.status_code}",
            "FR_OPTOUT_EVERY_MESSAGE",
        )
    return LintCheck(
        "unsubscribe", "ok", f"{url} answered {response.status_code}", "FR_OPTOUT_EVERY_MESSAGE"
    )
