"""The evidence pack: built from the store, rendered as Markdown, JSON and printable HTML."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from cli_fixtures import CliEnv, b2b_row, cli_env_fixture, write_csv  # noqa: F401

from prospect_mailer.cli import main
from prospect_mailer.evidence import build_evidence, render_evidence
from prospect_mailer.store import Store

ADDRESS = "marie.durand@co.example"


def _send(env: CliEnv) -> None:
    f = write_csv(env.root / "p.csv", [b2b_row(ADDRESS)])
    assert main(["prospects", "import", str(f)]) == 0
    assert main(["send", str(env.campaign), str(f)]) == 0


def test_pack_shows_origin_sends_objection_and_nothing_after(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    _send(cli_env)
    assert main(["suppress", "add", ADDRESS, "--scope", "advertiser",
                 "--scope-value", "acme-capteurs", "--reason", "unsubscribe"]) == 0  # fmt: skip
    step2 = cli_env.root / "step2.toml"
    text = cli_env.campaign.read_text("utf-8").replace(
        '"templates/', f'"{cli_env.campaign.parent}/templates/'
    )
    step2.write_text(text.replace("purpose =", "step = 2\npurpose ="), "utf-8")
    f = cli_env.root / "p.csv"
    assert main(["send", str(step2), str(f)]) == 1  # blocked by the objection
    capsys.readouterr()

    assert main(["evidence", ADDRESS.upper().replace("@CO.EXAMPLE", "@co.example")]) == 0
    md = capsys.readouterr().out
    assert "# Evidence pack for m***@co.example" in md
    assert "prospect registry" in md
    assert "**collection_method**: salon" in md
    assert "**legal_basis**: legitimate_interest" in md
    assert "scope **advertiser acme-capteurs**, reason unsubscribe" in md
    assert re.search(r"\| send sent \| capteurs-printemps-2026 \(step 1\)", md)
    assert re.search(
        r"\| send blocked \| capteurs-printemps-2026 \(step 2\) \| SUPP_CHECK_AT_SEND", md
    )
    assert "Confirmed: no message covered by an objection was sent" in md
    assert "1 later attempt(s) were blocked" in md
    assert "Hash chain verified" in md
    assert ADDRESS not in md  # the pack names the person only masked

    assert main(["evidence", ADDRESS, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["clean"] is True
    assert data["counts"] == {"pending": 1, "sent": 1, "blocked": 1}
    assert data["consent"] == {"legal_basis": "legitimate_interest"}
    assert data["objections"][0]["scope"] == "advertiser"

    html_file = cli_env.root / "pack.html"
    assert main(["evidence", ADDRESS, "--format", "html", "--output", str(html_file)]) == 0
    html = html_file.read_text("utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "<style>" in html
    assert "@media print" in html
    assert not re.search(r"<(link|script|img)\b|src=|url\(|https?://", html)  # self-contained


def test_pack_flags_a_send_after_the_objection(cli_env: CliEnv) -> None:
    _send(cli_env)

    async def backdated(store: Store) -> str:
        # An objection recorded as effective before the send: the pack must say NOT CLEAN.
        await store.suppression.add_address(
            ADDRESS, scope="global", scope_value="", reason="unsubscribe", source="web",
            created_at=datetime.now(UTC) - timedelta(days=1),
        )  # fmt: skip
        pack = await build_evidence(store, ADDRESS)
        assert not pack.clean
        assert len(pack.sent_after_objection) == 2
        return render_evidence(pack, "markdown")

    assert "**NOT CLEAN**" in cli_env.store_call(backdated)
    assert main(["evidence", ADDRESS]) == 1


def test_pack_for_an_unknown_address(cli_env: CliEnv, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evidence", "nobody@co.example"]) == 0
    md = capsys.readouterr().out
    assert "No registered prospect and no send recorded" in md
    assert "none: the address is not on the suppression list" in md
    assert main(["evidence", "not an address"]) == 2
