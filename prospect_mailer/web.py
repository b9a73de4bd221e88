"""The unsubscribe handler: an ASGI application (Starlette), mountable, served by uvicorn.

Routes (RULES.md RFC8058_POST_HANDLER, RFC8058_URI_TOKEN, FR_OPTOUT_HONOUR_PROMPTLY):

``GET /unsubscribe/{token}``
    200: a confirmation page naming the advertiser, one button; the narrower "only this
    campaign" choice is offered second and never pre-selected. **A GET writes nothing** (mail
    scanners prefetch links). 400: the token does not verify (a neutral page, no address).
``POST /unsubscribe/{token}``
    The body is parsed as a form (``multipart/form-data`` or urlencoded). It unsubscribes when
    it carries ``List-Unsubscribe=One-Click`` (RFC 8058, from a mail client: the default scope,
    every prospecting message from the advertiser) or the page's own ``confirm=yes`` field (with
    the chosen ``scope``). The suppression entry and its audit record are committed *before* the
    200 page; a repeat is a calm 200; never a redirect, no cookie, no authentication.
    400: neither field (a bare POST is consent to nothing; the confirmation page is shown again,
    nothing written), or a bad token (neutral page). 503: the store failed; nothing is claimed.
``GET /healthz``
    200 ``ok`` when the store answers, else 503 (the campaign lint's check,
    FR_OPTOUT_EVERY_MESSAGE).

Every page loads nothing from outside and needs no JavaScript; every response carries a strict
``Content-Security-Policy`` (the one ``<style>`` block allowed by its hash), ``nosniff``,
``Referrer-Policy: no-referrer`` and ``Cache-Control: no-store``.

Mounting in your own application: Starlette does not run a mounted app's lifespan, so pass an
opened ``store=`` you close yourself (without one, the store is opened on first use from the
settings and closed by the lifespan when this app is the top-level one).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings, load_settings
from .errors import StoreError, TokenError
from .optout import OptOutService
from .store import Store
from .tokens import TokenSigner, UnsubscribeToken

__all__ = ["LOCALES", "create_app", "negotiate_locale"]

#: Languages the pages exist in; the first is the default.
LOCALES: tuple[str, ...] = ("fr", "en")
# A one-click body is ~26 bytes; the page's form a few dozen. Anything big is not ours.
_MAX_BODY = 16 * 1024
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)
_SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


def negotiate_locale(accept_language: str | None, preferred: str | None = None) -> str:
    """The page language: ``preferred`` (the token's) if we have it, else the best
    ``Accept-Language`` match, else French.
    """
    if preferred in LOCALES:
        return preferred
    best, best_q = LOCALES[0], 0.0
    for item in (accept_language or "").split(","):
        tag, _, params = item.strip().partition(";")
        lang = tag.strip().lower().split("-", 1)[0]
        q = 1.0
        m = re.search(r"q\s*=\s*([^\s;,]*)", params)
        if m:
            try:
                q = float(m.group(1))
            except ValueError:
                q = 0.0  # an unreadable weight is no preference
        if lang in LOCALES and q > best_q:
            best, best_q = lang, q
    return best


class _SecurityHeaders:
    """Pure ASGI middleware: the same strict headers on every response (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in _SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", _csp("").encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _csp(html: str) -> str:
    """A policy allowing nothing but this page's own ``<style>`` blocks (by hash)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _STYLE.findall(html)
    ]
    style = " ".join(hashes) or "'none'"
    return (
        f"default-src 'none'; style-src {style}; img-src 'none'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


class _Handler:
    """The routes' shared state: settings, store, objection service, page templates."""

    def __init__(
        self,
        settings: Settings | None,
        store: Store | None,
        signer: TokenSigner | None,
        advertiser_names: Mapping[str, str] | None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._owns_store = False
        self._lock = asyncio.Lock()
        self._optout: OptOutService | None = None
        self.signer = signer or TokenSigner(self.settings.signing_keys())
        if advertiser_names is None:
            # Read the settings only if they are needed anyway (or were given).
            needed = settings is not None or store is None or signer is None
            advertiser_names = self.settings.advertiser_names if needed else {}
        self.names = dict(advertiser_names)
        here = Path(__file__).resolve().parent
        defaults = [d / "pages" for d in (here / "templates", here.parent / "templates")]
        user = [Path(d) / "pages" for d in (settings.template_dirs if settings else [])]
        self.env = Environment(
            loader=ChoiceLoader(
                [FileSystemLoader([d for d in user if d.is_dir()]), FileSystemLoader(defaults)]
            ),
            autoescape=True,
            undefined=StrictUndefined,
            auto_reload=False,
        )

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    async def optout(self) -> OptOutService:
        """The objection service, opening the store on first use if we were given none.

        Raises:
            StoreError: the store cannot be opened.
        """
        if self._optout is None:
            async with self._lock:
                if self._optout is None:
                    if self._store is None:
                        self._store = await Store.open(self.settings.database_url)
                        self._owns_store = True
                    self._optout = OptOutService(self._store, self.signer)
        return self._optout

    async def aclose(self) -> None:
        """Close the store if this app opened it."""
        if self._owns_store and self._store is not None:
            store, self._store, self._optout = self._store, None, None
            await store.close()

    # -- pages ----------------------------------------------------------------------------------

    def page(self, name: str, lang: str, status: int, **context: Any) -> HTMLResponse:
        html = self.env.get_template(f"{name}.{lang}.html.j2").render(lang=lang, **context)
        headers = {"content-security-policy": _csp(html), "content-language": lang}
        if status == 503:
            headers["retry-after"] = "60"
        return HTMLResponse(html, status_code=status, headers=headers)

    async def _context(self, tok: UnsubscribeToken) -> dict[str, Any]:
        """Names for the page: the configured name, else the registered campaign's advertiser
        legal name (a read, never a write; skipped if the store fails), else the id."""
        name = self.names.get(tok.advertiser_id)
        if name is None:
            try:
                optout = await self.optout()
                campaign = await optout.store.campaigns.get(tok.campaign_id)
            except StoreError:
                campaign = None
            if campaign is not None and campaign.advertiser.id == tok.advertiser_id:
                name = campaign.advertiser.legal_name
        return {"advertiser": name or tok.advertiser_id, "campaign": tok.campaign_id}

    def error(self, request: Request, *, unavailable: bool = False) -> HTMLResponse:
        # The token is not trusted here: the language comes from the browser only.
        lang = negotiate_locale(request.headers.get("accept-language"))
        return self.page("error", lang, 503 if unavailable else 400, unavailable=unavailable)

    # -- routes ---------------------------------------------------------------------------------

    async def confirm(self, request: Request) -> Response:
        """GET: show the confirmation page. Writes nothing."""
        try:
            tok = self.signer.verify(request.path_params["token"])
        except TokenError:
            return self.error(request)
        lang = negotiate_locale(request.headers.get("accept-language"), tok.locale)
        return self.page("confirm", lang, 200, missing_confirm=False, **await self._context(tok))

    async def unsubscribe(self, request: Request) -> Response:
        """POST: one-click or the page's button; suppress, then answer."""
        received = time.perf_counter()
        token = request.path_params["token"]
        try:
            tok = self.signer.verify(token)
        except TokenError:
            return self.error(request)
        lang = negotiate_locale(request.headers.get("accept-language"), tok.locale)
        form = await _read_form(request)
        one_click = form is not None and _one_click(form)
        from_page = form is not None and form.get("confirm") == "yes"
        if not (one_click or from_page):
            return self.page("confirm", lang, 400, missing_confirm=True, **await self._context(tok))
        # Only the page offers the narrower choice; one-click is always the full objection.
        narrow = (
            from_page and not one_click and form is not None and form.get("scope") == "campaign"
        )
        try:
            optout = await self.optout()
            result = await optout.unsubscribe(
                token,
                channel="one-click" if one_click else "web",
                narrow_to_campaign=narrow,
                received_at=received,
            )
            effective = optout.clock()
        except StoreError:
            return self.error(request, unavailable=True)
        except TokenError:  # pragma: no cover - verified above with the same signer
            return self.error(request)
        return self.page(
            "done",
            lang,
            200,
            repeated=not result.newly_added,
            scope=result.scope,
            effective=_when(effective),
            **await self._context(tok),
        )

    async def healthz(self, request: Request) -> Response:
        """200 when the store answers (a one-row read), 503 otherwise."""
        try:
            optout = await self.optout()
            await optout.store.audit.head()
        except StoreError:
            return PlainTextResponse("store unavailable\n", status_code=503)
        return PlainTextResponse("ok\n")


def _one_click(form: FormData) -> bool:
    # RFC 8058 §3.2: the body is exactly List-Unsubscribe=One-Click; compare the value
    # without case (an objection is never refused over a capital letter).
    return any(str(v).strip().lower() == "one-click" for v in form.getlist("List-Unsubscribe"))


async def _read_form(request: Request) -> FormData | None:
    """The POST body as a form, or ``None`` if it is not a form we can read."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > _MAX_BODY):
        return None
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return None
    try:
        return await request.form(max_files=0, max_fields=20, max_part_size=_MAX_BODY)
    except (HTTPException, ValueError):  # Starlette maps multipart errors to a 400
        return None


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    signer: TokenSigner | None = None,
    advertiser_names: Mapping[str, str] | None = None,
) -> Starlette:
    """Build the unsubscribe application.

    Args:
        settings: signing keys, database URL, advertiser names, template folders (a
            ``pages/`` folder in a template folder overrides the shipped pages); default: the
            environment and ``prospect-mailer.toml``.
        store: an opened store to use (you close it); default: opened from ``settings`` on
            first use and closed at shutdown.
        signer: the token signer; default: from ``settings``' keys.
        advertiser_names: advertiser id -> name shown on the pages; default
            ``settings.advertiser_names`` (without a name, the id is shown).

    Returns:
        A Starlette app; mount it (``Mount("/optout", app=create_app(...))``) or serve it with
        ``prospect-mailer serve``. ``app.state.handler.aclose()`` closes a store it opened.

    Raises:
        ConfigError: no usable signing key or invalid settings.
    """
    handler = _Handler(settings, store, signer, advertiser_names)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if store is None:
            await handler.optout()  # served standalone: a bad database URL fails at startup
        try:
            yield
        finally:
            await handler.aclose()

    app = Starlette(
        routes=[
            Route("/unsubscribe/{token}", handler.confirm, methods=["GET"]),
            Route("/unsubscribe/{token}", handler.unsubscribe, methods=["POST"]),
            Route("/healthz", handler.healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(_SecurityHeaders)
    app.state.handler = handler
    return app
