"""The unsubscribe handler behind a real uvicorn server on 127.0.0.1 (ephemeral port, same loop).

Also measures the opt-out latency end to end: from sending the POST to the moment a send to
that address is refused (RULES.md FR_OPTOUT_HONOUR_PROMPTLY; Gmail allows 48 hours).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp
from test_web import ONE_CLICK, entries, forged_tokens, multipart_one_click, path_of
from test_web_support import KEY, Sent, is_blocked, make_mailer, send_one

from prospect_mailer.config import Settings
from prospect_mailer.store import Store
from prospect_mailer.tokens import TokenSigner
from prospect_mailer.transport import MemoryTransport
from prospect_mailer.web import create_app

ADDR = "marie.curie@radium.example"


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1, port chosen by the OS; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what made the server stop
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def base(db: Store) -> AsyncIterator[str]:
    app = create_app(store=db, signer=TokenSigner([KEY]), advertiser_names={"acme": "ACME SAS"})
    async with serve(app) as url:
        yield url


async def _sent(db: Store) -> tuple[Sent, MemoryTransport]:
    transport = MemoryTransport()
    mailer = make_mailer(db, transport)
    s = await send_one(mailer, transport, ADDR)
    await mailer.close()
    return s, transport


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
async def test_one_click_over_http(db: Store, base: str, encoding: str) -> None:
    s, transport = await _sent(db)
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(2):
            got = await client.get(path_of(s))
            assert got.status_code == 200
        assert await entries(db) == []  # GET never suppresses
        if encoding == "urlencoded":
            r = await client.post(path_of(s), data=ONE_CLICK)
        else:
            body, ctype = multipart_one_click()
            r = await client.post(path_of(s), content=body, headers={"content-type": ctype})
        assert r.status_code == 200
        assert not r.is_redirect
        assert "set-cookie" not in r.headers
        again = await client.post(path_of(s), data=ONE_CLICK)
        assert again.status_code == 200
    assert await entries(db) == [("advertiser", "acme", "unsubscribe", "one-click")]
    mailer = make_mailer(db, transport)
    assert await is_blocked(mailer, ADDR)
    await mailer.close()


async def test_forged_tokens_over_http(db: Store, base: str) -> None:
    s, _ = await _sent(db)
    async with httpx.AsyncClient(base_url=base) as client:
        for bad in forged_tokens(s.token):
            r = await client.post("/unsubscribe/" + bad, data=ONE_CLICK)
            assert r.status_code == 400, bad
    assert await entries(db) == []


async def test_send_right_after_the_post_is_refused_and_latency_is_audited(
    db: Store, base: str
) -> None:
    """The POST's 200 comes after the commit: the very next send is refused (SUPP_CHECK_AT_SEND)."""
    s, transport = await _sent(db)
    mailer = make_mailer(db, transport)
    async with httpx.AsyncClient(base_url=base) as client:
        started = time.perf_counter()
        r = await client.post(path_of(s), data=ONE_CLICK)
        assert r.status_code == 200
        assert await is_blocked(mailer, ADDR)
        end_to_end_ms = (time.perf_counter() - started) * 1000
    await mailer.close()
    (event,) = [e for e in await db.audit.events(status="added") if e.kind == "suppression"]
    server_ms = event.details["latency_ms"]
    assert 0 < server_ms < end_to_end_ms < 10_000
    print(
        f"opt-out latency ({db.dialect}): commit {server_ms:.1f} ms after the POST arrived; "
        f"send refused {end_to_end_ms:.1f} ms after the POST was sent"
    )


async def test_healthz_over_http(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")


async def test_lifespan_opens_and_closes_its_own_store(db_url: str) -> None:
    """Without a store, the app opens one from the settings on first use and closes it."""
    settings = Settings(database_url=db_url, secret_key=KEY)
    app = create_app(settings)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/healthz")).status_code == 200
    assert app.state.handler._store is None  # closed at shutdown
