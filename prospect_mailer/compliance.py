"""Footers and headers into a MIME message (pipeline step 5; pure, no I/O but template loading).

What every prospecting message gets, whatever built it (library, relay, CLI):

* in every ``text/plain`` and ``text/html`` body part, a footer with three blocks: the origin of
  the data (GDPR_ART14_NOTICE_FIRST_CONTACT, FR_PARTNER_FIRST_MESSAGE_SOURCE), a separate
  right-to-object sentence (GDPR_ART21_OBJECTION_ABSOLUTE), and the advertiser's identity with a
  visible unsubscribe link (FR_SENDER_IDENTITY, FR_OPTOUT_EVERY_MESSAGE);
* exactly one ``List-Unsubscribe`` (HTTPS first, then mailto) and one
  ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC2369_LIST_UNSUBSCRIBE_SYNTAX,
  RFC8058_ONE_CLICK_HEADERS), plus ``Message-ID``, ``Date`` and ``MIME-Version`` when missing.

Footers are Jinja2 templates ``footer.<locale>.txt.j2`` and ``footer.<locale>.html.j2``; a
user's template folders take precedence over the shipped ones. See ``templates/`` for the
variables they receive (:meth:`FooterRenderer.template_context`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from email.message import EmailMessage
from email.utils import make_msgid
from functools import lru_cache
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from jinja2 import (
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    meta,
    nodes,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import escape

from .errors import ConfigError, InvalidMessageError
from .mime import (
    CommaFoldedHeader,
    add_footer,
    check_headers_safe,
    date_value,
    footable_parts,
    parse_message,
)

__all__ = [
    "HTML_FOOTER_CLASS",
    "HTML_OBJECTION_CLASS",
    "HTML_OPTOUT_CLASS",
    "HTML_ORIGIN_CLASS",
    "LIST_UNSUBSCRIBE_POST",
    "TEXT_FOOTER_SEPARATOR",
    "FooterContext",
    "FooterRenderer",
    "RenderedFooters",
    "apply_compliance",
    "build_list_unsubscribe",
    "check_headers_safe",
    "format_date",
]

#: First line of every text footer (the usenet signature separator, "dash dash space").
TEXT_FOOTER_SEPARATOR: Final = "-- "
#: CSS class of the ``<div>`` wrapping every HTML footer.
HTML_FOOTER_CLASS: Final = "prospect-mailer-footer"
#: CSS class of the origin-of-data block (GDPR art. 14(2)(f)).
HTML_ORIGIN_CLASS: Final = "pm-origin"
#: CSS class of the right-to-object sentence (GDPR art. 21(4)).
HTML_OBJECTION_CLASS: Final = "pm-objection"
#: CSS class of the identity and opt-out block (CPCE L.34-5).
HTML_OPTOUT_CLASS: Final = "pm-optout"
#: The only value RFC 8058 section 3.1 allows in ``List-Unsubscribe-Post``.
LIST_UNSUBSCRIBE_POST: Final = "List-Unsubscribe=One-Click"

_SOURCE_TYPES = frozenset({"direct", "partner", "broker", "public"})
_URI_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>,\"]")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_MONTHS: Final = {
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
           "septembre", "octobre", "novembre", "décembre"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
}  # fmt: skip
_STRING_CACHE_SIZE = 128


@dataclass(frozen=True, slots=True)
class FooterContext:
    """Everything a footer shows for one recipient of one campaign.

    Attributes:
        locale: ``"fr"`` or ``"en"``; picks ``footer.<locale>.*.j2``.
        advertiser_legal_name: the person the mail is sent for (FR_SENDER_IDENTITY).
        advertiser_postal_address: its postal address; line breaks are shown as ``", "``.
        advertiser_contact: an e-mail address, phone or web page to exercise rights.
        unsubscribe_url: the ``https://`` one-click URL, always shown as a visible link.
        unsubscribe_mailto: a ``mailto:`` unsubscribe URI, or ``None``.
        source_name: who collected the data, or ``None`` (general wording, GDPR recital 61).
        source_type: ``direct``, ``partner``, ``broker``, ``public`` or ``None``.
        collection_method: how the data was collected (``"trade-show badge scan"``), or ``None``.
        collected_at: when it was collected, or ``None``.
        first_contact: first message from this advertiser to this person (adds the art. 14
            notice sentence).
        campaign_id: the campaign, available to custom templates.
        recipient_name: the recipient's name, available to custom templates.

    Raises:
        ConfigError: the advertiser's legal name, postal address or contact is empty.
        InvalidMessageError: bad locale, source type or unsubscribe URI (see
            :func:`build_list_unsubscribe`).
    """

    locale: Literal["fr", "en"]
    advertiser_legal_name: str
    advertiser_postal_address: str
    advertiser_contact: str
    unsubscribe_url: str
    unsubscribe_mailto: str | None
    source_name: str | None
    source_type: str | None
    collection_method: str | None
    collected_at: date | None
    first_contact: bool
    campaign_id: str
    recipient_name: str | None = None

    def __post_init__(self) -> None:
        if self.locale not in _MONTHS:
            raise InvalidMessageError(f"unsupported footer locale {self.locale!r}")
        empty = _empty_identity_field(
            self.advertiser_legal_name, self.advertiser_postal_address, self.advertiser_contact
        )
        if empty:
            raise ConfigError(
                f"{empty} is empty: the footer must name the advertiser "
                "and how to reach it (FR_SENDER_IDENTITY)"
            )
        if self.source_type is not None and self.source_type not in _SOURCE_TYPES:
            raise InvalidMessageError(
                f"source_type must be one of {sorted(_SOURCE_TYPES)}, not {self.source_type!r}"
            )
        build_list_unsubscribe(self.unsubscribe_url, self.unsubscribe_mailto)


_CONTEXT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(FooterContext))


@lru_cache(maxsize=256)
def _empty_identity_field(legal_name: str, postal_address: str, contact: str) -> str:
    """The first of the advertiser's identity fields that is blank, or ``""`` (the same three
    values for every message of a campaign: checked once)."""
    values = {
        "advertiser_legal_name": legal_name,
        "advertiser_postal_address": postal_address,
        "advertiser_contact": contact,
    }
    return next((name for name, value in values.items() if not _oneline(value)), "")


@dataclass(frozen=True, slots=True)
class RenderedFooters:
    """The two footers for one message.

    Attributes:
        text: the plain-text footer; starts with the line ``"-- "``.
        html: the HTML footer, a ``<div class="prospect-mailer-footer">``.
        template_hash: SHA-256 hex over the two template sources used (for the audit log).
    """

    text: str
    html: str
    template_hash: str


def format_date(value: date, locale: str = "fr") -> str:
    """Format a date for a footer: ``1er mars 2024`` (fr) or ``1 March 2024`` (en)."""
    months = _MONTHS.get(locale, _MONTHS["en"])
    day = "1er" if locale == "fr" and value.day == 1 else str(value.day)
    return f"{day} {months[value.month - 1]} {value.year}"


def _oneline(value: str | None, *, sep: str = " ") -> str:
    """Collapse line breaks (to ``sep``) and runs of white space: user data stays on its line."""
    if value is None:
        return ""
    if sep == " ":
        # Every line break str.splitlines() knows is white space to str.split(): the same.
        return " ".join(value.split())
    lines = [" ".join(line.split()) for line in value.splitlines()]
    return sep.join(line for line in lines if line)


class FooterRenderer:
    """Renders footers (and campaign bodies) with one Jinja2 environment.

    Templates are looked up in ``template_dirs`` first (in order), then in the shipped
    ``templates`` folder: ``<package>/templates`` in an installed wheel, ``<repo>/templates`` in
    a source checkout. HTML templates (``*.html.j2``) are autoescaped, text templates are not;
    an undefined variable is an error. The environment is sandboxed (campaign templates may come
    from data files) and does not auto-reload, so a template hash stays true for the renderer's
    lifetime.

    Attributes:
        env: the Jinja2 environment.

    Raises:
        ConfigError: a template folder does not exist.
    """

    def __init__(self, template_dirs: Sequence[str | Path] = ()) -> None:
        user_dirs = [Path(d) for d in template_dirs]
        for folder in user_dirs:
            if not folder.is_dir():
                raise ConfigError(f"template folder {str(folder)!r} does not exist")
        here = Path(__file__).resolve().parent
        defaults = [d for d in (here / "templates", here.parent / "templates") if d.is_dir()]
        self.env = SandboxedEnvironment(
            loader=ChoiceLoader([FileSystemLoader(user_dirs), FileSystemLoader(defaults)]),
            autoescape=select_autoescape(
                enabled_extensions=("html.j2", "htm.j2", "html", "htm"),
                disabled_extensions=(),
                default_for_string=False,
                default=False,
            ),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self.env.filters["format_date"] = format_date
        self._envs = {
            True: self.env.overlay(autoescape=True),
            False: self.env.overlay(autoescape=False),
        }
        self._compiled: dict[tuple[bool, str], Template] = {}
        self._hashes: dict[tuple[str, str], str] = {}
        self._used: dict[tuple[str, str], tuple[str, ...] | None] = {}
        self._footers: dict[tuple[object, ...], tuple[str, str] | Literal[False]] = {}

    @staticmethod
    def template_context(ctx: FooterContext) -> dict[str, object]:
        """The variables a footer template receives.

        Every :class:`FooterContext` field (strings with line breaks collapsed), plus
        ``collected_on`` (the date formatted for the locale, or ``None``) and
        ``unsubscribe_address`` (the address of ``unsubscribe_mailto``, or ``None``).
        """
        values: dict[str, object] = {}
        for name in _CONTEXT_FIELDS:
            value = getattr(ctx, name)
            values[name] = (_oneline(value) or None) if isinstance(value, str) else value
        values["advertiser_postal_address"] = _oneline(ctx.advertiser_postal_address, sep=", ")
        values["collected_on"] = (
            format_date(ctx.collected_at, ctx.locale) if ctx.collected_at is not None else None
        )
        mailto = ctx.unsubscribe_mailto
        values["unsubscribe_address"] = mailto[7:].split("?", 1)[0] if mailto else None
        return values

    def render(self, ctx: FooterContext) -> RenderedFooters:
        """Render the text and HTML footers for ``ctx``.

        Footers differ between the recipients of a campaign mostly by their unsubscribe links,
        so a rendering is reused for every context that gives the templates the same values,
        with the links swapped in (see :meth:`_render_cached`).

        Raises:
            ConfigError: a footer template is missing or broken, or leaves out what the rules
                require (separator, unsubscribe URL, legal name, HTML block classes).
        """
        names = (f"footer.{ctx.locale}.txt.j2", f"footer.{ctx.locale}.html.j2")
        values = self.template_context(ctx)
        text, html = self._render_cached(names, values)
        _verify_footers(text, html, ctx, names)
        return RenderedFooters(text=text, html=html, template_hash=self._hash(names))

    def _render(self, names: tuple[str, str], values: Mapping[str, object]) -> tuple[str, str]:
        try:
            text, html = (self.env.get_template(n).render(values) for n in names)
        except TemplateNotFound as exc:
            raise ConfigError(f"footer template {exc.name!r} not found") from exc
        except TemplateError as exc:
            raise ConfigError(f"footer template failed to render: {exc}") from exc
        return text, html

    def _render_cached(self, names: tuple[str, str], values: dict[str, object]) -> tuple[str, str]:
        """What :meth:`_render` gives, from a rendering with placeholder links when it can.

        The key is the values of the variables the two templates read (found by parsing
        them), links excepted, and whether there is a mailto. A key is only cached once two
        renderings with *different* placeholder links turn out identical after the swap, i.e.
        the templates use the links only verbatim (not their length, not in a test); templates
        that include, extend or import others are never cached (their variables are not all
        visible). Anything else is rendered every time.
        """
        used = self._variables(names)
        if used is None:
            return self._render(names, values)
        has_mailto = values["unsubscribe_mailto"] is not None
        key = (names, has_mailto, tuple(values.get(v) for v in used))
        cached = self._footers.get(key)
        if cached is None:
            first = self._render(names, {**values, **_placeholders(0, has_mailto)})
            second = self._render(names, {**values, **_placeholders(1, has_mailto)})
            same = _swap_links(first, 0, has_mailto, _MARK) == _swap_links(
                second, 1, has_mailto, _MARK
            )
            if len(self._footers) >= _FOOTER_CACHE_SIZE:
                self._footers.clear()
            cached = self._footers[key] = first if same else False
        if cached is False:
            return self._render(names, values)
        return _swap_links(cached, 0, has_mailto, values)

    def _variables(self, names: tuple[str, str]) -> tuple[str, ...] | None:
        """The variables the two templates read, links excepted; ``None``: do not cache."""
        if names not in self._used:
            found: set[str] | None = set()
            for name in names:
                try:
                    assert self.env.loader is not None
                    source = self.env.loader.get_source(self.env, name)[0]
                    tree = self.env.parse(source)
                except TemplateNotFound as exc:
                    raise ConfigError(f"footer template {exc.name!r} not found") from exc
                except TemplateError:
                    found = None  # rendering will report it
                    break
                if any(
                    tree.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport))
                ):
                    found = None
                    break
                assert found is not None
                found |= meta.find_undeclared_variables(tree)
            self._used[names] = (
                None if found is None else tuple(sorted(found - set(_LINK_VARIABLES)))
            )
        return self._used[names]

    def render_string(self, source: str, context: Mapping[str, object], *, html: bool) -> str:
        """Render a campaign body template given as source.

        Autoescaped only when ``html`` is true; undefined variables raise. Compiled templates
        are cached by source, so rendering one campaign for many recipients compiles once.

        Raises:
            ConfigError: the template has a syntax error or fails to render.
        """
        key = (html, source)
        template = self._compiled.get(key)
        try:
            if template is None:
                if len(self._compiled) >= _STRING_CACHE_SIZE:
                    self._compiled.clear()
                template = self._compiled[key] = self._envs[html].from_string(source)
            return template.render(context)
        except TemplateError as exc:
            kind = "HTML" if html else "text"
            raise ConfigError(f"{kind} body template failed: {exc}") from exc

    def _hash(self, names: tuple[str, str]) -> str:
        cached = self._hashes.get(names)
        if cached is None:
            digest = hashlib.sha256()
            for name in names:
                assert self.env.loader is not None
                source = self.env.loader.get_source(self.env, name)[0].encode("utf-8")
                # Length-prefixed, so two sources cannot be re-split into another pair.
                digest.update(len(source).to_bytes(8, "big") + source)
            cached = self._hashes[names] = digest.hexdigest()
        return cached


_FOOTER_CACHE_SIZE = 1024
_LINK_VARIABLES = ("unsubscribe_url", "unsubscribe_mailto", "unsubscribe_address")
# Placeholder links: plain ASCII that no escaping changes, two of each so that a template
# that reads a link other than verbatim (its length, a test on it) gives two renderings that
# differ. The address is a substring of the mailto URI: the URI is always swapped first.
_PLACEHOLDERS = (
    ("https://pm-placeholder.invalid/u/AAAA", "mailto:unsubscribe+PMAAAA@pm-placeholder.invalid"),
    ("https://pm-placeholder.invalid/unsub/BBBBBBBBBB",
     "mailto:unsub+PMBBBBBBBBBB@pm-placeholder.invalid"),
)  # fmt: skip
_MARK = {
    "unsubscribe_url": "\x00U\x00",
    "unsubscribe_mailto": "\x00M\x00",
    "unsubscribe_address": "\x00A\x00",
}


def _placeholders(which: int, has_mailto: bool) -> dict[str, object]:
    url, mailto = _PLACEHOLDERS[which]
    return {
        "unsubscribe_url": url,
        "unsubscribe_mailto": mailto if has_mailto else None,
        "unsubscribe_address": mailto[7:] if has_mailto else None,
    }


def _swap_links(
    rendered: tuple[str, str], which: int, has_mailto: bool, values: Mapping[str, object]
) -> tuple[str, str]:
    """``rendered`` (from placeholders ``which``) with the links of ``values`` swapped in:
    as they are in the text footer, HTML-escaped in the HTML one."""
    text, html = rendered
    for key, old in _swapped_marks(which, has_mailto):
        new = str(values[key])
        text = text.replace(old, new)
        html = html.replace(old, str(escape(new)))
    return text, html


@lru_cache(maxsize=8)
def _swapped_marks(which: int, has_mailto: bool) -> tuple[tuple[str, str], ...]:
    """The links :func:`_swap_links` replaces, in order (the mailto URI before the address
    it holds), each with its placeholder in rendering ``which``."""
    marks = _placeholders(which, has_mailto)
    order = ("unsubscribe_mailto", "unsubscribe_address", "unsubscribe_url")
    return tuple((k, str(marks[k])) for k in order if marks[k] is not None)


def _verify_footers(text: str, html: str, ctx: FooterContext, names: tuple[str, str]) -> None:
    """Refuse footers (e.g. from a user's template) that drop a required element."""
    legal = _oneline(ctx.advertiser_legal_name)
    found = (
        text.startswith(TEXT_FOOTER_SEPARATOR + "\n"),
        ctx.unsubscribe_url in text,
        legal in text,
        f'href="{escape(ctx.unsubscribe_url)}"' in html,
        str(escape(legal)) in html,
        *(marker in html for marker, _ in _HTML_CLASSES),
    )
    if all(found):
        return  # every message: nothing else to build
    for ok, (template, what) in zip(found, _FOOTER_NEEDS, strict=True):
        if not ok:
            raise ConfigError(
                f"footer template {names[template]!r} must {what} "
                "(FR_SENDER_IDENTITY, FR_OPTOUT_EVERY_MESSAGE, GDPR_ART21_OBJECTION_ABSOLUTE)"
            )


_HTML_CLASSES: Final = tuple(
    (f'class="{cls}"', f"have an element of class {cls!r}")
    for cls in (HTML_FOOTER_CLASS, HTML_ORIGIN_CLASS, HTML_OBJECTION_CLASS, HTML_OPTOUT_CLASS)
)
#: What :func:`_verify_footers` checks, in its order: (0 text, 1 HTML template; the wording).
_FOOTER_NEEDS: Final = (
    (0, "start with a '-- ' line"),
    (0, "show the unsubscribe URL"),
    (0, "name the advertiser"),
    (1, "link the unsubscribe URL"),
    (1, "name the advertiser"),
    *((1, what) for _, what in _HTML_CLASSES),
)


def _check_uri(uri: str, what: str) -> None:
    if not uri.isascii() or _URI_FORBIDDEN.search(uri):
        raise InvalidMessageError(
            f"{what} {uri!r} must be ASCII without white space, control characters, quotes, "
            "'<', '>' or ',' (percent-encode them)"
        )


def build_list_unsubscribe(https_url: str, mailto: str | None) -> str:
    """Return the ``List-Unsubscribe`` header value: ``<https://...>, <mailto:...>``.

    RFC 2369 syntax, HTTPS first (clients use the left-most scheme they support), as RFC 8058
    one-click needs.

    Raises:
        InvalidMessageError: the URL is not ``https://`` with a host, the mailto does not start
            with ``mailto:`` or has no address, or either holds white space, ``<``, ``>``, ``,``,
            quotes, control or non-ASCII characters.
    """
    return _list_unsubscribe(https_url, mailto)


# The authority of a URL after its "https://": up to the first "/", "?" or "#", as urlsplit
# takes it (the URL has no white space or control character: checked first).
_AUTHORITY: Final = re.compile(r"[^/?#]*")


@lru_cache(maxsize=64)
def _has_host(authority: str) -> bool:
    """``urlsplit("https://" + authority).hostname`` is not empty: asked once per host, not
    for every link (each unsubscribe URL differs by its token; urlsplit costs 5-10 µs)."""
    return bool(urlsplit("https://" + authority).hostname)


@lru_cache(maxsize=64)
def _list_unsubscribe(https_url: str, mailto: str | None) -> str:
    """:func:`build_list_unsubscribe`, kept for the last links: composing one message checks
    its links twice (footer context, then headers). An error is raised again, never kept."""
    _check_uri(https_url, "unsubscribe URL")
    if not https_url.lower().startswith("https://") or not _has_host(
        _AUTHORITY.match(https_url, 8).group()  # type: ignore[union-attr]
    ):
        raise InvalidMessageError(
            f"unsubscribe URL {https_url!r} must be https:// with a host (RFC 8058 one-click)"
        )
    if mailto is None:
        return f"<{https_url}>"
    _check_uri(mailto, "unsubscribe mailto")
    if not mailto.lower().startswith("mailto:") or "@" not in mailto.split("?", 1)[0]:
        raise InvalidMessageError(f"unsubscribe mailto {mailto!r} must be 'mailto:addr@domain'")
    return f"<{https_url}>, <{mailto}>"


def apply_compliance(
    message: EmailMessage | bytes,
    footers: RenderedFooters,
    *,
    list_unsubscribe_url: str,
    list_unsubscribe_mailto: str | None,
    message_id_domain: str,
    now: datetime,
) -> EmailMessage:
    """Return a copy of ``message`` with the footers and compliance headers added.

    The caller's object is never changed. Footers go into every ``text/plain`` and
    ``text/html`` part that is not an attachment (see :func:`prospect_mailer.mime.add_footer`
    for charsets and transfer encodings); attachments and other parts come out byte-identical.
    Any ``List-Unsubscribe``/``List-Unsubscribe-Post`` the caller set is replaced by exactly one
    of each; ``Message-ID`` (``@message_id_domain``), ``Date`` (``now``; naive means UTC) and
    ``MIME-Version`` are added only when missing.

    Raises:
        InvalidMessageError: a header decodes to CR/LF/NUL, the message has no text part to
            foot, is signed or encrypted, already holds several ``List-Unsubscribe`` fields, or
            an argument is invalid (URI, domain).
    """
    unsubscribe = build_list_unsubscribe(list_unsubscribe_url, list_unsubscribe_mailto)
    if not _DOMAIN.match(message_id_domain) or ".." in message_id_domain:
        raise InvalidMessageError(f"invalid message_id_domain {message_id_domain!r}")
    msg = parse_message(message)
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post"):
        if sum(1 for key in msg if key.lower() == name.lower()) > 1:
            raise InvalidMessageError(f"the message already has several {name} fields")
    for part in footable_parts(msg):
        html = part.get_content_subtype() == "html"
        add_footer(part, footers.html if html else footers.text)
    del msg["List-Unsubscribe"]
    del msg["List-Unsubscribe-Post"]
    # Stored as header objects so no policy (not even aiosmtplib's policy.SMTP) can refold them.
    msg.set_raw("List-Unsubscribe", CommaFoldedHeader("List-Unsubscribe", unsubscribe))
    msg.set_raw(
        "List-Unsubscribe-Post", CommaFoldedHeader("List-Unsubscribe-Post", LIST_UNSUBSCRIBE_POST)
    )
    if "Message-ID" not in msg:
        msg["Message-ID"] = make_msgid(domain=message_id_domain)
    # Short ASCII values of our own, written as they are: stored raw rather than parsed into
    # header objects that nobody reads here (a reader still gets one, as for any parsed header).
    if "Date" not in msg:
        msg.set_raw("Date", date_value(now))
    if "MIME-Version" not in msg:
        msg.set_raw("MIME-Version", "1.0")
    return msg
