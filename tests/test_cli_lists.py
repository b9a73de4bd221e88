"""``prospects import|export|purge``, ``suppress ...`` and ``audit export`` on both databases."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import pytest
from cli_fixtures import HEADER, CliEnv, b2b_row, cli_env_fixture, write_csv  # noqa: F401

from prospect_mailer.addresses import domain_key
from prospect_mailer.cli import main
from prospect_mailer.retention import PURGE_SOURCE
from prospect_mailer.store import Store


def _counts(env: CliEnv) -> tuple[int, int, int]:
    async def run(store: Store) -> tuple[int, int, int]:
        return (
            await store.prospects.count(),
            await store.suppression.count(),
            await store.audit.count(),
        )

    return env.store_call(run)


def test_import_reports_bad_rows_and_imports_the_good(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [b2b_row(f"p{i}@co.example") for i in range(6)]
    rows[1] = b2b_row("p1@co.example", collected="12/03/2026")  # line 3, bad date
    rows[4] = rows[4] + ",extra"  # line 6
    f = write_csv(cli_env.root / "p.csv", rows)
    assert main(["prospects", "import", str(f)]) == 2
    out = capsys.readouterr().out
    assert f"{f}:3 [collected_at]" in out
    assert f"{f}:6: 12 cells" in out
    assert "6 rows, 4 imported, 2 bad" in out
    assert _counts(cli_env)[0] == 4


def test_import_dialects_semicolon_bom_latin1(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    semi = cli_env.root / "semi.csv"
    semi.write_bytes(
        (
            "\ufeff" + HEADER.replace(",", ";") + "\n" + b2b_row("a@co.example").replace(",", ";")
        ).encode("utf-8")
    )
    assert main(["prospects", "import", str(semi)]) == 0
    latin = write_csv(
        cli_env.root / "l.csv",
        [b2b_row("b@co.example").replace(",P,", ",Hélène Côté,")],
        encoding="latin-1",
    )
    assert main(["prospects", "import", str(latin)]) == 2  # not UTF-8: nothing imported
    assert f"{latin}:2: not valid utf-8-sig text" in capsys.readouterr().err
    assert _counts(cli_env)[0] == 1
    assert main(["prospects", "import", str(latin), "--encoding", "latin-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 1

    async def name(store: Store) -> str | None:
        p = await store.prospects.get("b@co.example")
        return p.name if p else None

    assert cli_env.store_call(name) == "Hélène Côté"


def test_reimport_of_suppressed_address_is_flagged_and_skipped(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["suppress", "add", "gone@co.example"]) == 0
    assert main(["suppress", "add", "rival.example", "--scope", "advertiser",
                 "--scope-value", "other-adv"]) == 0  # fmt: skip
    f = write_csv(
        cli_env.root / "p.csv",
        [b2b_row("ok@co.example"), b2b_row("Gone@CO.example"), b2b_row("x@sales.rival.example")],
    )
    capsys.readouterr()
    assert main(["prospects", "import", str(f)]) == 1
    out = capsys.readouterr().out
    assert "2 address(es) on the suppression list: not imported" in out
    assert "Gone@CO.example" in out
    assert "x@sales.rival.example" in out
    assert _counts(cli_env)[0] == 1
    assert main(["prospects", "import", str(f), "--include-suppressed"]) == 1
    assert _counts(cli_env)[0] == 3


def test_export_round_trips_and_leaves_out_suppressed(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write_csv(cli_env.root / "p.csv", [b2b_row(f"p{i}@co.example") for i in range(5)])
    assert main(["prospects", "import", str(f)]) == 0
    assert main(["suppress", "add", "p2@co.example"]) == 0
    capsys.readouterr()
    assert main(["prospects", "export"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["email"] for r in rows) == ["p0@co.example", "p1@co.example",
                                                "p3@co.example", "p4@co.example"]  # fmt: skip
    out = cli_env.root / "all.csv"
    assert main(["prospects", "export", "--include-suppressed", "--output", str(out)]) == 0
    assert main(["prospects", "import", str(out), "--include-suppressed"]) == 1  # flags p2
    assert _counts(cli_env)[0] == 5


def test_purge_dry_run_then_purge_keeps_hashes_and_audits(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [b2b_row(f"old{i}@co.example", collected="2020-01-15") for i in range(3)]
    rows += [b2b_row("new@co.example", collected="2026-01-15")]
    rows += ["undated@co.example,P,professional,,,,,,,,"]
    f = write_csv(cli_env.root / "p.csv", rows)
    assert main(["prospects", "import", str(f)]) == 0
    before = _counts(cli_env)
    capsys.readouterr()
    assert main(["prospects", "purge", "--dry-run", "--now", "2026-06-01"]) == 0
    out = capsys.readouterr().out
    assert "old0@co.example" in out
    assert "2023-01-15" in out
    assert "dry run" in out
    assert _counts(cli_env) == before
    assert main(["prospects", "purge", "--now", "2026-06-01", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["expired"], result["purged"], result["undated"]) == (3, 3, 1)
    prospects, suppressed, audit = _counts(cli_env)
    assert (prospects, suppressed) == (2, 3)
    assert audit == before[2] + 3

    async def entries(store: Store) -> list[str]:
        return [h.source async for h in store.suppression.iter_entries()]

    assert cli_env.store_call(entries) == [PURGE_SOURCE] * 3
    # SUPP_SURVIVES_DELETION: a re-import is flagged and blocked
    assert main(["prospects", "import", str(f)]) == 1
    assert main(["audit", "export", "--status", "purged"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(records) == 3
    assert all(r["rule_ids"] == ["FR_PROSPECT_RETENTION_3Y"] for r in records)
    assert all("old" not in json.dumps(r) for r in records)  # masked, never the address


def test_suppress_add_check_remove_are_audited(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["suppress", "check", "a@co.example", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["a@co.example"]["suppressed"] is False
    assert main(["suppress", "add", "A@Co.Example", "co2.example"]) == 0
    assert main(["suppress", "check", "a@co.example", "b@mail.co2.example"]) == 1
    out = capsys.readouterr().out
    assert out.count("yes") == 2
    assert main(["suppress", "remove", "a@co.example"]) == 2  # --reason is required
    assert main(["suppress", "remove", "a@co.example", "--reason", "typo, ticket 12"]) == 0
    assert main(["suppress", "remove", "a@co.example", "--reason", "again"]) == 1  # nothing left
    assert main(["suppress", "check", "a@co.example"]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["kind"], r["status"]) for r in rows] == [("suppression", "added")] * 2 + [
        ("suppression", "removed")
    ]
    assert "typo, ticket 12" in rows[2]["details"]
    assert main(["suppress", "add", "not an address@"]) == 2


def test_hashed_list_import_is_all_or_nothing(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    hashes = [hashlib.sha256(f"p{i}@co.example".encode()).hexdigest() for i in range(1000)]
    bad = cli_env.root / "partner.sha256"
    lines = ["# partner feed", "", *hashes[:500], hashes[500][:-1], *hashes[501:]]
    bad.write_text("\n".join(lines) + "\n", "utf-8")
    assert main(["suppress", "import", str(bad)]) == 2
    assert f"{bad}:503: not a SHA-256" in capsys.readouterr().err
    assert _counts(cli_env)[1] == 0
    good = cli_env.root / "ok.sha256"
    good.write_text("\n".join(hashes) + "\n", "utf-8")
    assert main(["suppress", "import", str(good)]) == 0
    assert main(["suppress", "import", str(good)]) == 0  # idempotent
    assert _counts(cli_env)[1] == 1000
    assert main(["suppress", "check", "p999@co.example"]) == 1
    capsys.readouterr()
    assert main(["suppress", "export"]) == 0
    assert capsys.readouterr().out.split() == hashes
    addresses = cli_env.root / "a.txt"
    addresses.write_text("x@co.example\nnot-an-address\n", "utf-8")
    assert main(["suppress", "import", str(addresses), "--format", "addresses"]) == 2
    assert f"{addresses}:2:" in capsys.readouterr().err


def test_domain_entries_exported_as_hashes_import_back_as_domain_entries(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """``export --kind domain --format hashes`` then ``import --format hashes --kind domain``
    keeps them domain entries (without ``--kind`` they would come back as address entries)."""
    assert main(["suppress", "add", "co.example", "other.example"]) == 0
    exported = cli_env.root / "domains.sha256"
    assert main(["suppress", "export", "--kind", "domain", "--output", str(exported)]) == 0
    assert sorted(exported.read_text("utf-8").split()) == sorted(
        [domain_key("co.example"), domain_key("other.example")]
    )
    assert main(["suppress", "remove", "co.example", "--reason", "moved"]) == 0
    assert main(["suppress", "remove", "other.example", "--reason", "moved"]) == 0
    assert main(["suppress", "import", str(exported), "--kind", "domain"]) == 0
    capsys.readouterr()
    assert main(["suppress", "export", "--kind", "domain"]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(exported.read_text("utf-8").split())
    assert main(["suppress", "export", "--kind", "address"]) == 0
    assert capsys.readouterr().out.split() == []
    assert main(["suppress", "check", "ann@mail.co.example"]) == 1  # subdomains covered
    # --kind is for hashed lists: a list of addresses cannot be imported as domain entries.
    addresses = cli_env.root / "a.txt"
    addresses.write_text("x@co.example\n", "utf-8")
    assert (
        main(["suppress", "import", str(addresses), "--format", "addresses", "--kind", "domain"])
        == 2
    )
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert "holds address entries; --kind is for --format hashes" in err


def test_audit_export_filters_and_verify(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [b2b_row("a@co.example"), b2b_row("b@co.example", job="Chef")]
    f = write_csv(cli_env.root / "p.csv", rows)
    assert main(["send", str(cli_env.campaign), str(f)]) == 1
    capsys.readouterr()
    assert main(["audit", "export", "--status", "blocked", "--campaign",
                 "capteurs-printemps-2026"]) == 0  # fmt: skip
    (blocked,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "FR_B2B_PROFESSIONAL_RELEVANCE" in blocked["rule_ids"]
    assert blocked["recipient_masked"] == "b***@co.example"
    assert main(["audit", "export", "--campaign", "other"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "export", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "export", "--since", "yesterday"]) == 2
    out = cli_env.root / "all.csv"
    assert (
        main(["audit", "export", "--format", "csv", "--until", "2999-01-01", "--output", str(out)])
        == 0
    )
    with out.open(encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 3  # blocked, pending, sent
    assert main(["audit", "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_audit_export_unresolved_lists_only_sends_without_a_final_record(
    cli_env: CliEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    from prospect_mailer.store import AuditEvent

    f = write_csv(cli_env.root / "p.csv", [b2b_row("a@co.example")])
    assert main(["send", str(cli_env.campaign), str(f)]) == 0
    capsys.readouterr()
    assert main(["audit", "export", "--unresolved"]) == 0
    assert capsys.readouterr().out == ""  # pending, then sent: resolved

    crashed = AuditEvent(kind="send", status="pending", send_id="c" * 32, campaign_id="c1",
                         step=1, recipient_hash="d" * 64)  # fmt: skip
    cli_env.store_call(lambda store: store.audit.append([crashed]))
    assert main(["audit", "export", "--unresolved"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (row["send_id"], row["status"]) == ("c" * 32, "pending")
