"""The command line, called in-process through ``main(argv)`` and once as the console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prospect_mailer.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_demo_prints_outcomes_and_writes_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--examples", str(EXAMPLES), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for rule in (
        "SUPP_CHECK_AT_SEND",
        "FR_B2C_CONSENT_REQUIRED",
        "FR_B2B_PROFESSIONAL_RELEVANCE",
        "FR_PARTNER_TRANSFER_CONSENT",
        "FR_PROSPECT_RETENTION_3Y",
        "GDPR_ART7_CONSENT_PROOF",
        "GDPR_ART14_NOTICE_FIRST_CONTACT",
    ):
        assert rule in text
    assert "audit chain verified" in text
    emls = list((out / "outbox").glob("*.eml"))
    assert len(emls) == 6
    assert all(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in e.read_bytes() for e in emls)


def test_bad_campaign_file_exits_2_with_the_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "ex")
    campaign = tmp_path / "ex" / "campaign.toml"
    campaign.write_text(campaign.read_text("utf-8").replace('"prospecting"', '"spam"'), "utf-8")
    code = main(["demo", "--examples", str(tmp_path / "ex"), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "[purpose]" in capsys.readouterr().err


def test_usage_error_exits_2() -> None:
    assert main(["no-such-command"]) == 2


def test_audit_verify_detects_tampering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    out = tmp_path / "demo"
    assert main(["demo", "--examples", str(EXAMPLES), "--output", str(out)]) == 0
    db = out / "prospect-mailer.db"
    monkeypatch.setenv("PROSPECT_MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    assert main(["audit", "verify"]) == 0
    con = sqlite3.connect(db)
    con.execute("UPDATE audit_events SET status = 'sent' WHERE seq = 3")
    con.commit()
    con.close()
    capsys.readouterr()
    assert main(["audit", "verify"]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().out


def test_console_script_is_installed_and_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "prospect-mailer"
    assert exe.exists(), "console script missing: is the package installed?"
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [str(exe), "demo", "--examples", str(EXAMPLES), "--output", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "FR_PROSPECT_RETENTION_3Y" in result.stdout


def test_sales_script_example_runs_as_is_and_resumes(tmp_path: Path) -> None:
    """examples/sales_script.py: no configuration, the outbox, and no duplicate on a re-run."""
    script = EXAMPLES / "sales_script.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROSPECT_MAILER_")}
    first = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "'sent': 7" in first.stdout  # the demo's extra objection is not made here
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 7
    second = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "'duplicate': 7" in second.stdout
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 7
