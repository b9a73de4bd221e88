"""A real headless Chromium (Debian's, driven by Playwright) unsubscribes from a message the
library sent, through a real uvicorn server, with JavaScript disabled.

The link is taken from the message's ``List-Unsubscribe`` header, and its
``https://optout.acme.example`` prefix is rewritten to the local ``http://127.0.0.1:PORT``: the
token is what the handler reads, and TLS belongs to the reverse proxy in front of it in a real
deployment. Serving TLS here would mean ``--ignore-certificate-errors``, which tests nothing of
ours and teaches the browser to accept anything.

Set ``PM_UPDATE_SCREENSHOTS=1`` to refresh ``docs/unsubscribe-invalid.png``,
``docs/unsubscribe-confirm.png`` and
``docs/unsubscribe-done.png`` (the README's pictures); otherwise they go to a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from test_web import entries
from test_web_support import BASE, KEY, is_blocked, make_mailer, send_one
from test_web_uvicorn import serve

from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import MemoryTransport
from prospect_mailer.web import create_app

CHROMIUM = Path("/usr/bin/chromium")
ADDR = "marie.curie@radium.example"
DOCS = Path(__file__).resolve().parent.parent / "docs"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (pip install -e '.[test]')",
    ),
]


async def test_unsubscribe_in_a_real_browser(db_url: str, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    shots = DOCS if os.environ.get("PM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    async with Store.connect(db_url) as store:
        transport = MemoryTransport()
        mailer = make_mailer(store, transport)
        sent = await send_one(mailer, transport, ADDR)
        app = create_app(
            store=store, signer=TokenSigner([KEY]), advertiser_names={"acme": "ACME SAS"}
        )
        async with serve(app) as local, async_playwright() as pw:
            assert sent.url.startswith(BASE + "/unsubscribe/")
            link = local + sent.url.removeprefix(BASE)
            # launch_persistent_context is Playwright's way to pass a fresh --user-data-dir.
            context = await pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=FLAGS,
                java_script_enabled=False,
                viewport={"width": 720, "height": 560},
                locale="fr-FR",
            )
            try:
                requests: list[str] = []
                page = context.pages[0] if context.pages else await context.new_page()
                page.on("request", lambda req: requests.append(req.url))
                response = await page.goto(link)
                assert response is not None
                assert response.status == 200
                assert await page.get_attribute("html", "lang") == "fr"
                heading = page.get_by_role("heading", level=1)
                assert "ACME SAS" in await heading.inner_text()
                default = page.get_by_label("aucun message de prospection de ACME SAS")
                assert await default.is_checked()
                assert not await page.get_by_label("seulement", exact=False).is_checked()
                await page.screenshot(path=str(shots / "unsubscribe-confirm.png"), full_page=True)
                assert await entries(store) == []  # opening the page changed nothing

                async with page.expect_navigation():
                    await page.get_by_role("button", name="Me désinscrire").click()
                assert "Votre désinscription est enregistrée" in await heading.inner_text()
                assert "ACME SAS ne vous enverra plus" in await page.content()
                await page.screenshot(path=str(shots / "unsubscribe-done.png"), full_page=True)
                # Nothing but our own pages was loaded (no font, no tracker, no favicon host).
                assert requests
                assert all(url.startswith(local + "/") for url in requests), requests
                assert await context.cookies() == []

                # A forged link: a neutral page that names nobody and changes nothing.
                forged = link[:-3] + ("aaa" if not link.endswith("aaa") else "bbb")
                bad = await page.goto(forged)
                assert bad is not None
                assert bad.status == 400
                assert ADDR not in await page.content()
                await page.screenshot(path=str(shots / "unsubscribe-invalid.png"), full_page=True)
            finally:
                await context.close()
        assert await entries(store) == [("advertiser", "acme", "unsubscribe", "web")]
        assert await is_blocked(mailer, ADDR)
        await mailer.close()
