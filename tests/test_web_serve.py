"""``prospect-mailer serve`` as a user runs it: a subprocess, a real port, SIGTERM to stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
from test_web_support import KEY

from prospect_mailer.addresses import normalise
from prospect_mailer.cli.serve import parse_listen
from prospect_mailer.errors import ConfigError
from prospect_mailer.store import Store, sqlite_url
from prospect_mailer.tokens import TokenSigner, UnsubscribeToken

RUN_CLI = "from prospect_mailer.cli import main; raise SystemExit(main())"


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


async def _start(tmp_path: Path, db: str) -> tuple[asyncio.subprocess.Process, str]:
    env = {
        **os.environ,
        "PROSPECT_MAILER_DATABASE_URL": db,
        "PROSPECT_MAILER_SECRET_KEY": KEY,
        "PROSPECT_MAILER_ADVERTISER_NAMES": '{"acme": "ACME SAS"}',
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_CLI,
        "serve",
        "--listen",
        "127.0.0.1:0",
        cwd=tmp_path,
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    async with asyncio.timeout(30):
        while not (m := re.search(rb"running on (http://127\.0\.0\.1:\d+)", seen)):
            line = await proc.stderr.readline()
            if not line:
                raise AssertionError(f"serve exited: {seen.decode(errors='replace')}")
            seen += line
    return proc, m.group(1).decode()


async def test_serve_command(tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "pm.db")
    proc, base = await _start(tmp_path, db)
    try:
        token = TokenSigner([KEY]).make(
            UnsubscribeToken(
                recipient_hash=normalise("a@b.example").key_hash,
                advertiser_id="acme",
                campaign_id="spring",
            )
        )
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).text == "ok\n"
            page = await client.get(f"/unsubscribe/{token}")
            assert "ACME SAS" in page.text  # the advertiser name from the environment
            assert "server" not in page.headers
            r = await client.post(f"/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"})
            assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await proc.communicate()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the parent sees the signal.
    assert proc.returncode in (0, -signal.SIGTERM), err.decode()
    assert b"Application shutdown complete" in err
    async with Store.connect(db) as store:
        assert await store.suppression.count() == 1


async def test_serve_refuses_a_bad_database(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_CLI,
        "serve",
        "--listen",
        "127.0.0.1:0",
        cwd=tmp_path,
        env={
            **os.environ,
            "PROSPECT_MAILER_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:1/none",
            "PROSPECT_MAILER_SECRET_KEY": KEY,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 1, (out, err)
    assert b"did not start" in out + err
