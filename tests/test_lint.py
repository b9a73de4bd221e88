"""``prospect-mailer lint``: real footers and compliance step, endpoint checked over HTTPS."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from cli_fixtures import EXAMPLES

from prospect_mailer.cli import main
from prospect_mailer.cli.app import console
from prospect_mailer.files import load_campaign
from prospect_mailer.lint import check_unsubscribe_endpoint


@pytest.fixture
def campaign_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROSPECT_MAILER_BASE_URL", "https://127.0.0.1:9")
    monkeypatch.setenv("PROSPECT_MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setattr(console, "width", 250)
    text = (EXAMPLES / "campaign.toml").read_text("utf-8")
    (tmp_path / "campaign.toml").write_text(text.replace('"templates/', f'"{EXAMPLES}/templates/'))
    return tmp_path


def _edit(folder: Path, old: str, new: str) -> Path:
    path = folder / "campaign.toml"
    path.write_text(path.read_text("utf-8").replace(old, new), "utf-8")
    return path


def _checks(capsys: pytest.CaptureFixture[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in json.loads(capsys.readouterr().out)["checks"]:
        out.setdefault(c["name"], []).append(c["status"])
    return out


def test_example_campaign_lints_clean_offline(
    campaign_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lint", str(campaign_dir / "campaign.toml"), "--offline", "--json"]) == 0
    checks = _checks(capsys)
    assert checks["purpose"] == ["ok"]
    assert checks["identity"] == ["ok"]
    assert checks["templates"] == ["ok"]
    assert checks["footers"] == ["ok"]
    assert checks["from_domain"] == ["warn"]  # .example is not deliverable
    assert checks["unsubscribe"] == ["ok", "skipped"]
    assert main(["lint", str(campaign_dir / "campaign.toml"), "--offline", "--strict"]) == 1


def test_findings_fail_the_lint(campaign_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _edit(campaign_dir, 'purpose = "prospecting"\n', "")
    path = _edit(
        campaign_dir,
        'postal_address = "12 rue des Entrepôts, 69007 Lyon, France"',
        'postal_address = ""',
    )
    path = _edit(campaign_dir, "claire.martin@acme-capteurs.example", "claire.martin@gmail.com")
    assert main(["lint", str(path), "--offline", "--json"]) == 1
    checks = _checks(capsys)
    assert checks["purpose"] == ["fail"]
    assert checks["identity"] == ["fail"]
    assert checks["footers"] == ["fail"]  # the footer cannot name the advertiser's address
    assert checks["from_domain"] == ["warn"]


def test_template_that_does_not_render(
    campaign_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = campaign_dir / "body.txt.j2"
    body.write_text("Bonjour {{ prospect.surname }}\n", "utf-8")
    path = _edit(campaign_dir, f'"{EXAMPLES}/templates/capteurs.txt.j2"', '"body.txt.j2"')
    assert main(["lint", str(path), "--offline", "--json"]) == 1
    assert _checks(capsys)["templates"] == ["fail"]


def test_unreachable_endpoint_and_placeholder_fail(
    campaign_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["lint", str(campaign_dir / "campaign.toml"), "--json", "--timeout", "2"]) == 1
    assert _checks(capsys)["unsubscribe"] == ["ok", "fail"]
    monkeypatch.delenv("PROSPECT_MAILER_BASE_URL")
    assert main(["lint", str(campaign_dir / "campaign.toml"), "--json"]) == 1
    assert _checks(capsys)["unsubscribe"] == ["fail"]  # placeholder: not even requested


@pytest.fixture
async def https_server() -> AsyncIterator[tuple[str, ssl.SSLContext, dict[str, int]]]:
    """A real HTTPS server on 127.0.0.1 (trustme CA) answering /healthz with a chosen code."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    state = {"code": 200}
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        seen.append(request.split(b" ")[1].decode())
        code = state["code"]
        writer.write(
            f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"https://127.0.0.1:{port}", client_ctx, state
    assert set(seen) <= {"/healthz"}


async def test_endpoint_check_over_real_https(
    https_server: tuple[str, ssl.SSLContext, dict[str, int]],
) -> None:
    url, ctx, state = https_server
    ok = await check_unsubscribe_endpoint(url, verify=ctx)
    assert (ok.status, ok.rule_id) == ("ok", "FR_OPTOUT_EVERY_MESSAGE")
    state["code"] = 503
    assert (await check_unsubscribe_endpoint(url, verify=ctx)).status == "fail"
    untrusted = await check_unsubscribe_endpoint(url)  # unknown CA: a failure, not a pass
    assert untrusted.status == "fail"
    assert load_campaign(EXAMPLES / "campaign.toml").purpose == "prospecting"
