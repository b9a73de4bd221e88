"""The unsubscribe handler in-process (httpx.ASGITransport), on a real SQLite file and PostgreSQL.

Every token comes from a message the library sent; the suppression table is read back to show
what a request did (or did not) write.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from test_web_support import (
    ADDR,
    CAMPAIGN,
    KEY,
    Sent,
    is_blocked,
    make_mailer,
    send_one,
)

from prospect_mailer.addresses import normalise
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner, UnsubscribeToken
from prospect_mailer.transport import MemoryTransport
from prospect_mailer.web import create_app, negotiate_locale

HASH = normalise(ADDR).key_hash
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
NAMES = {"acme": "ACME SAS"}


def multipart_one_click(boundary: str = "----pmBoundary7MA4YWxk") -> tuple[bytes, str]:
    """The body a mail client sends for RFC 8058 one-click as multipart/form-data (§3.2)."""
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        f"One-Click\r\n--{boundary}--\r\n"
    ).encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
async def client(db: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store=db, signer=TokenSigner([KEY]), advertiser_names=NAMES)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://optout.acme.example") as c:
        yield c


def path_of(s: Sent) -> str:
    return "/unsubscribe/" + s.token


async def entries(db: Store) -> list[tuple[str, str, str, str]]:
    hits = (await db.suppression.lookup([HASH])).get(HASH, [])
    return sorted((h.scope, h.scope_value, h.reason, h.source) for h in hits)


def assert_strict_headers(r: httpx.Response) -> None:
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'none'", "form-action 'self'", "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["cache-control"] == "no-store"
    assert "set-cookie" not in r.headers
    assert "location" not in r.headers


def assert_self_contained(html: str) -> None:
    """No script, no external resource, and the inline style allowed by the CSP hash."""
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "external resource"
    assert " style=" not in html


async def test_get_shows_confirmation_and_writes_nothing(
    db: Store, sent: tuple[Sent, MemoryTransport], client: httpx.AsyncClient
) -> None:
    s, _ = sent
    audit_before = await db.audit.count()
    for _ in range(3):  # link scanners prefetch, sometimes repeatedly
        r = await client.get(path_of(s))
        assert r.status_code == 200
        head = await client.head(path_of(s))
        assert head.status_code == 200
    assert_strict_headers(r)
    html = r.text
    assert_self_contained(html)
    assert '<html lang="fr">' in html
    assert "ACME SAS" in html
    assert '<form method="post">' in html
    # One button; the default scope pre-selected, the narrower choice offered second.
    assert html.count("<button") == 1
    radios = re.findall(r"<input type=\"radio\"[^>]*>", html)
    assert [("advertiser" in x, "checked" in x) for x in radios] == [(True, True), (False, False)]
    for label_for in re.findall(r'<label for="([^"]+)"', html):
        assert f'id="{label_for}"' in html
    style = re.search(r"<style>(.*?)</style>", html, re.DOTALL)
    assert style
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in r.headers["content-security-policy"]
    assert await entries(db) == []
    assert await db.audit.count() == audit_before


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
async def test_one_click_post_suppresses_before_answering(
    db: Store, sent: tuple[Sent, MemoryTransport], client: httpx.AsyncClient, encoding: str
) -> None:
    s, transport = sent
    if encoding == "urlencoded":
        r = await client.post(path_of(s), data=ONE_CLICK)
        assert r.request.headers["content-type"] == "application/x-www-form-urlencoded"
    else:
        body, ctype = multipart_one_click()
        r = await client.post(path_of(s), content=body, headers={"content-type": ctype})
    assert r.status_code == 200
    assert_strict_headers(r)
    assert_self_contained(r.text)
    assert "Votre désinscription est enregistrée" in r.text
    # Committed before the answer: visible from the moment the response is in our hands.
    assert await entries(db) == [("advertiser", "acme", "unsubscribe", "one-click")]
    mailer = make_mailer(db, transport)
    assert await is_blocked(mailer, ADDR)
    await mailer.close()
    (event,) = [e for e in await db.audit.events(recipient_hash=HASH) if e.kind == "suppression"]
    assert event.status == "added"
    assert event.transport == "one-click"
    assert 0 < event.details["latency_ms"] < 5000
    assert event.details["effective_at"]


async def test_post_is_idempotent(
    db: Store, sent: tuple[Sent, MemoryTransport], client: httpx.AsyncClient
) -> None:
    s, _ = sent
    first = await client.post(path_of(s), data=ONE_CLICK)
    second = await client.post(path_of(s), data=ONE_CLICK)
    third = await client.post(path_of(s), data={"confirm": "yes", "scope": "advertiser"})
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 200]
    assert "déjà" in second.text
    assert await entries(db) == [("advertiser", "acme", "unsubscribe", "one-click")]
    statuses = [
        e.status for e in await db.audit.events(recipient_hash=HASH) if e.kind == "suppression"
    ]
    assert statuses == ["added", "repeated", "repeated"]


async def test_page_button_and_the_narrower_choice(
    db: Store, sent: tuple[Sent, MemoryTransport], client: httpx.AsyncClient
) -> None:
    s, transport = sent
    r = await client.post(path_of(s), data={"confirm": "yes", "scope": "campaign"})
    assert r.status_code == 200
    assert "campagne « spring »" in r.text.replace("&nbsp;", " ").replace("\xa0", " ")
    assert await entries(db) == [("campaign", "spring", "unsubscribe", "web")]
    mailer = make_mailer(db, transport)
    assert await is_blocked(mailer, ADDR)
    other = CAMPAIGN.model_copy(update={"id": "autumn"})
    assert not await is_blocked(mailer, ADDR, other)  # a preference, not an objection
    await mailer.close()
    # One-click always means the full objection, whatever else the form carries.
    await client.post(path_of(s), data={**ONE_CLICK, "scope": "campaign"})
    assert ("advertiser", "acme", "unsubscribe", "one-click") in await entries(db)


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"", "application/x-www-form-urlencoded"),
        (b"List-Unsubscribe=One-Click", "text/plain"),  # not a form: not parsed as one
        (b"List-Unsubscribe=Two-Clicks", "application/x-www-form-urlencoded"),
        (b"scope=campaign", "application/x-www-form-urlencoded"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
        (
            b"List-Unsubscribe=One-Click" + b"&x=" + b"y" * 20000,
            "application/x-www-form-urlencoded",
        ),
    ],
)
async def test_post_without_consent_field_is_400(
    db: Store,
    sent: tuple[Sent, MemoryTransport],
    client: httpx.AsyncClient,
    content: bytes,
    ctype: str,
) -> None:
    s, _ = sent
    r = await client.post(path_of(s), content=content, headers={"content-type": ctype})
    assert r.status_code == 400
    assert_strict_headers(r)
    assert '<form method="post">' in r.text  # the page again, to confirm properly
    assert await entries(db) == []


def forged_tokens(token: str) -> list[str]:
    """The token with each payload field altered (signature kept), truncated, re-signed with
    another key, one character flipped at several places, and random."""
    payload_b64, sig = token.rsplit(".", 1)
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    out = []
    other_hash = base64.urlsafe_b64encode(hashlib.sha256(b"x").digest()).decode().rstrip("=")
    for field, value in [
        ("r", other_hash),
        ("a", "other"),
        ("c", "x"),
        ("s", "global"),
        ("l", "en"),
        ("v", 2),
    ]:
        changed = {**payload, field: value}
        raw = json.dumps(changed, separators=(",", ":")).encode()
        out.append(base64.urlsafe_b64encode(raw).decode().rstrip("=") + "." + sig)
    out += [token[:n] for n in (1, 10, len(token) // 2, len(token) - 1)]
    out.append(
        TokenSigner(["another-key-0123456789abcdef"]).make(
            UnsubscribeToken(recipient_hash=HASH, advertiser_id="acme", campaign_id="spring")
        )
    )
    for i in (0, len(token) // 2, len(token) - 1):
        c = token[i]
        out.append(token[:i] + ("A" if c != "A" else "B") + token[i + 1 :])
    out += [base64.urlsafe_b64encode(bytes(range(40))).decode(), "x", "a.b", token + "x"]
    return out


async def test_forged_tokens_change_nothing(
    db: Store, sent: tuple[Sent, MemoryTransport], client: httpx.AsyncClient
) -> None:
    s, _ = sent
    audit_before = await db.audit.count()
    for bad in forged_tokens(s.token):
        for method in ("GET", "POST"):
            r = await client.request(
                method, "/unsubscribe/" + bad, data=ONE_CLICK if method == "POST" else None
            )
            assert r.status_code == 400, (method, bad)
            assert_strict_headers(r)
            assert "radium" not in r.text
            assert HASH not in r.text
            assert "ACME" not in r.text
            assert "n'est pas valide" in r.text
    assert await entries(db) == []
    assert await db.audit.count() == audit_before


async def test_store_failure_is_503_and_claims_nothing(db_url: str) -> None:
    async with Store.connect(db_url) as store:
        transport = MemoryTransport()
        mailer = make_mailer(store, transport)
        s = await send_one(mailer, transport, ADDR)
        await mailer.close()
    # The store is closed: every write fails. The page must not say "unsubscribed".
    app = create_app(store=store, signer=TokenSigner([KEY]), advertiser_names=NAMES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://t") as c:
        r = await c.post(path_of(s), data=ONE_CLICK)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "60"
        assert_strict_headers(r)
        assert "indisponible" in r.text
        assert "enregistrée" not in r.text.split("</h1>")[0]
        assert (await c.get("/healthz")).status_code == 503
        assert (await c.get(path_of(s))).status_code == 200  # the GET needs no store
    async with Store.connect(db_url) as reopened:
        assert await reopened.suppression.count() == 0


async def test_healthz_and_other_routes(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    assert_strict_headers(r)
    missing = await client.get("/nothing")
    assert missing.status_code == 404
    assert_strict_headers(missing)
    assert (await client.put("/unsubscribe/abc")).status_code == 405


async def test_languages(db: Store, client: httpx.AsyncClient) -> None:
    transport = MemoryTransport()
    mailer = make_mailer(db, transport)
    en = await send_one(mailer, transport, ADDR, CAMPAIGN.model_copy(update={"locale": "en"}))
    await mailer.close()
    r = await client.get(path_of(en), headers={"accept-language": "fr-FR,fr;q=0.9"})
    assert '<html lang="en">' in r.text
    assert "Stop receiving marketing emails from ACME SAS" in r.text
    assert r.headers["content-language"] == "en"
    done = await client.post(path_of(en), data=ONE_CLICK)
    assert "You are unsubscribed" in done.text
    # A bad token says nothing about the recipient: the browser's language decides.
    bad = await client.get("/unsubscribe/x", headers={"accept-language": "en-GB,en;q=0.8"})
    assert '<html lang="en">' in bad.text
    assert "not valid" in bad.text
    assert '<html lang="fr">' in (await client.get("/unsubscribe/x")).text


@pytest.mark.parametrize(
    ("header", "token_locale", "expected"),
    [
        (None, None, "fr"),
        ("en-US,en;q=0.9", None, "en"),
        ("de-DE, en;q=0.5, fr;q=0.7", None, "fr"),
        ("de, en;q=0.5", None, "en"),
        ("en;q=bad, fr;q=0.1", None, "fr"),
        ("en", "fr", "fr"),
        ("fr", "de", "fr"),
        ("en", "de", "en"),
    ],
)
def test_negotiate_locale(header: str | None, token_locale: str | None, expected: str) -> None:
    assert negotiate_locale(header, token_locale) == expected


async def test_advertiser_name_from_the_campaign_registry(
    db: Store, sent: tuple[Sent, MemoryTransport]
) -> None:
    app = create_app(store=db, signer=TokenSigner([KEY]))  # no names configured
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://t") as c:
        s, _ = sent
        assert (
            "Ne plus recevoir de messages de prospection de acme<" in (await c.get(path_of(s))).text
        )
        await db.campaigns.upsert(CAMPAIGN)
        assert "prospection de ACME SAS<" in (await c.get(path_of(s))).text
