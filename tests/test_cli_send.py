"""``prospect-mailer send``: dry run and report, resume without duplicates, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_fixtures import CliEnv, b2b_row, cli_env_fixture, read_report, write_csv  # noqa: F401

from prospect_mailer.cli import main
from prospect_mailer.store import Store


def _audit_count(env: CliEnv) -> int:
    async def count(store: Store) -> int:
        return await store.audit.count()

    return env.store_call(count)


def test_dry_run_reports_every_recipient_and_records_nothing(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    prospects = Path(__file__).parent.parent / "examples" / "prospects.csv"
    report = cli_env.root / "report.csv"
    code = main(
        ["send", str(cli_env.campaign), str(prospects), "--dry-run", "--report", str(report)]
    )
    assert code == 1  # some recipients would be blocked
    out = capsys.readouterr().out
    assert "(dry run)" in out
    assert "FR_PROSPECT_RETENTION_3Y" in out
    rows = read_report(report)
    assert len(rows) == 13
    assert {r["status"] for r in rows} == {"allowed", "blocked"}
    blocked = [r for r in rows if r["status"] == "blocked"]
    assert all(r["rule_ids"] for r in blocked)
    assert not cli_env.outbox.exists() or not list(cli_env.outbox.iterdir())
    assert _audit_count(cli_env) == 0

    as_json = cli_env.root / "report.json"
    assert main(["send", str(cli_env.campaign), str(prospects), "--dry-run", "--json",
                 "--report", str(as_json)]) == 1  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    data = json.loads(as_json.read_text("utf-8"))
    assert len(data["outcomes"]) == 13 == summary["recipients"]
    assert data["totals"] == summary["totals"] == {"allowed": 7, "blocked": 6}
    assert sum(data["blocked_by_rule"].values()) >= 6


def test_send_then_rerun_sends_nothing_twice(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_file = write_csv(cli_env.root / "p.csv", [b2b_row(f"p{i}@co.example") for i in range(30)])
    argv = ["send", str(cli_env.campaign), str(csv_file), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == {"sent": 30}
    assert len(list(cli_env.outbox.glob("*.eml"))) == 30
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == {"duplicate": 30}
    assert len(list(cli_env.outbox.glob("*.eml"))) == 30
    # the dry run sees the same: every recipient already sent
    assert main([*argv, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == {"duplicate": 30}


def test_bad_rows_refuse_the_run_before_anything_is_sent(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [b2b_row(f"p{i}@co.example") for i in range(10)]
    rows[3] = b2b_row("not-an-address")  # line 5
    rows[7] = rows[7].replace(",FR", ",France")  # line 9, country
    rows[8] = "p8@co.example,too,few"  # line 10
    csv_file = write_csv(cli_env.root / "bad.csv", rows)
    assert main(["send", str(cli_env.campaign), str(csv_file)]) == 2
    out = capsys.readouterr().out
    assert "3 bad row(s)" in out
    assert "nothing was sent" in out
    assert f"{csv_file}:5 [email]" in out
    assert f"{csv_file}:9 [country]" in out
    assert f"{csv_file}:10: 3 cells but the header has 11" in out
    assert not cli_env.outbox.exists() or not list(cli_env.outbox.iterdir())
    assert _audit_count(cli_env) == 0


def test_unknown_column_wrong_encoding_and_campaign_key_exit_2(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = write_csv(cli_env.root / "u.csv", [b2b_row("a@co.example")], header="email,nom")
    assert main(["send", str(cli_env.campaign), str(unknown)]) == 2
    assert f"{unknown}:1: unknown column(s) ['nom']" in capsys.readouterr().err

    latin = cli_env.root / "latin.csv"
    write_csv(latin, [b2b_row("a@co.example").replace(",P,", ",Hélène,")], encoding="latin-1")
    assert main(["send", str(cli_env.campaign), str(latin), "--dry-run"]) == 2
    assert f"{latin}:2: not valid utf-8-sig text" in capsys.readouterr().err
    assert (
        main(["send", str(cli_env.campaign), str(latin), "--dry-run", "--encoding", "latin-1"]) == 0
    )

    bad_campaign = cli_env.root / "campaign.toml"
    text = cli_env.campaign.read_text("utf-8").replace(
        "templates/", str(cli_env.campaign.parent / "templates") + "/"
    )
    bad_campaign.write_text(
        text.replace('locale = "fr"', 'locale = "fr"\nsubjekt = "typo"'), "utf-8"
    )
    capsys.readouterr()
    assert main(["send", str(bad_campaign), str(latin), "--encoding", "latin-1"]) == 2
    assert f"{bad_campaign} [subjekt]: Extra inputs are not permitted" in capsys.readouterr().err
    assert _audit_count(cli_env) == 0


def test_report_must_be_csv_or_json(cli_env: CliEnv) -> None:
    csv_file = write_csv(cli_env.root / "p.csv", [b2b_row("a@co.example")])
    argv = ["send", str(cli_env.campaign), str(csv_file), "--dry-run", "--report", "r.txt"]
    assert main(argv) == 2


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(cli_env: CliEnv) -> None:
    """The installed console script, interrupted by SIGINT mid-run, then run again."""
    n = 4000
    csv_file = write_csv(cli_env.root / "p.csv", [b2b_row(f"p{i}@co.example") for i in range(n)])
    exe = Path(sys.executable).parent / "prospect-mailer"
    argv = [str(exe), "send", str(cli_env.campaign), str(csv_file), "--concurrency", "4"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite started in the background by a shell without job control (`make test &`,
        # some CI runners) ignores SIGINT, and the send would inherit that and finish.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(cli_env.outbox.glob("*.eml"))) < 50:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "run the same command again to resume" in out
    first = len(list(cli_env.outbox.glob("*.eml")))
    assert 50 <= first < n, "interrupted too late to test a resume"
    assert subprocess.run([str(exe), "audit", "verify"], env=env, check=False).returncode == 0

    again = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    totals = json.loads(again.stdout)["totals"]
    emls = list(cli_env.outbox.glob("*.eml"))
    recipients = [
        next(ln for ln in e.read_text("utf-8").splitlines() if ln.startswith("To:")) for e in emls
    ]
    assert len(recipients) == len(set(recipients)), "a recipient got two messages"
    # an interrupted in-flight message stays `pending` (maybe sent): never sent again
    assert totals["sent"] + totals["duplicate"] == n
    assert totals["duplicate"] >= first
    assert len(emls) == totals["sent"] + first
