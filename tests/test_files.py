"""Campaign TOML and prospects CSV loading: good files load, bad ones name the place."""

from __future__ import annotations

from pathlib import Path

import pytest

from prospect_mailer.errors import DataFileError
from prospect_mailer.files import iter_prospects, load_campaign, load_prospects

EXAMPLES = Path(__file__).parent.parent / "examples"

CAMPAIGN = """\
id = "c1"
purpose = "prospecting"
subject = "Hello"
from = "ACME Sales <sales@acme.example>"
category = "sensors"
target_functions = ["CTO"]
locale = "en"
text_template = "body.txt.j2"

[advertiser]
id = "acme"
legal_name = "ACME SAS"
postal_address = "1 rue X, Paris"
contact = "dpo@acme.example"
"""


def write_campaign(tmp_path: Path, text: str = CAMPAIGN) -> Path:
    (tmp_path / "body.txt.j2").write_text("Hi {{ prospect.name }}", "utf-8")
    p = tmp_path / "campaign.toml"
    p.write_text(text, "utf-8")
    return p


def test_example_files_load() -> None:
    c = load_campaign(EXAMPLES / "campaign.toml")
    assert c.advertiser.id == "acme-capteurs"
    assert c.text_template
    assert "Bonjour" in c.text_template
    assert len(load_prospects(EXAMPLES / "prospects.csv")) >= 12


def test_campaign_from_header_is_split(tmp_path: Path) -> None:
    c = load_campaign(write_campaign(tmp_path))
    assert (c.from_name, c.from_address) == ("ACME Sales", "sales@acme.example")
    assert c.text_template == "Hi {{ prospect.name }}"


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (('purpose = "prospecting"', 'purpose = "spam"'), "[purpose]"),
        (('from = "ACME Sales <sales@acme.example>"', 'from = "nobody"'), "[from]"),
        (('subject = "Hello"', 'subject = ""'), "[subject]"),
        (('text_template = "body.txt.j2"', 'text_template = "missing.j2"'), "[text_template]"),
        (('id = "acme"', 'id = "bad id!"'), "[advertiser.id]"),
        (('locale = "en"', 'locale = "en"\nunknown_key = 1'), "[unknown_key]"),
        (('id = "c1"', 'id = "c1'), "TOML syntax error"),
    ],
)
def test_bad_campaign_names_the_key(tmp_path: Path, edit: tuple[str, str], where: str) -> None:
    path = write_campaign(tmp_path, CAMPAIGN.replace(*edit))
    with pytest.raises(DataFileError) as info:
        load_campaign(path)
    assert where in str(info.value)
    assert str(path) in str(info.value)


def test_missing_campaign_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="cannot read campaign file"):
        load_campaign(tmp_path / "nope.toml")


HEADER = "email,name,recipient_type,collected_at,purchased_categories,optout_offered_at_collection"


def test_csv_semicolon_bom_and_lists(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text(
        "\ufeffemail;name;purchased_categories;optout_offered_at_collection\n"
        'a@x.example;Ann;"sensors;thermo";oui\n\n'
        "b@x.example;;;\n",
        "utf-8",
    )
    rows = load_prospects(p)
    assert rows[0].purchased_categories == ("sensors", "thermo")
    assert rows[0].optout_offered_at_collection is True
    assert rows[1].name is None  # empty cell = unknown


def test_csv_latin1(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_bytes("email,name\nlea@x.example,Léa\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"p.csv:2.*latin-1"):
        load_prospects(p)
    assert load_prospects(p, encoding="latin-1")[0].name == "Léa"


def test_csv_bad_rows_are_all_reported_nothing_loaded(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text(
        HEADER + "\n"
        "ok@x.example,A,individual,2026-01-01,,yes\n"
        "not-an-address,B,individual,2026-01-01,,yes\n"
        "c@x.example,C,martian,2026-01-01,,yes\n"
        "d@x.example,D,individual,yesterday,,yes\n"
        "e@x.example,E,individual,2026-01-01,,maybe\n"
        "f@x.example,F\n",
        "utf-8",
    )
    with pytest.raises(DataFileError) as info:
        load_prospects(p)
    text = str(info.value)
    assert "5 bad row(s), nothing loaded" in text
    for needle in (
        "p.csv:3 [email]",
        "p.csv:4 [recipient_type]",
        "p.csv:5 [collected_at]",
        "p.csv:6 [optout_offered_at_collection]",
        "p.csv:7: 2 cells",
    ):
        assert needle in text


def test_iter_prospects_stops_at_first_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("email\na@x.example\nbad\nc@x.example\n", "utf-8")
    it = iter_prospects(p)
    assert next(it).email == "a@x.example"
    with pytest.raises(DataFileError, match=r"p.csv:3 \[email\]"):
        next(it)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("name,colour\n", "unknown column"),
        ("name\nx\n", "no 'email' column"),
        ("email,email\n", "duplicate column"),
    ],
)
def test_csv_bad_header(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "p.csv"
    p.write_text(content, "utf-8")
    with pytest.raises(DataFileError, match=message) as info:
        load_prospects(p)
    assert info.value.line == 1


def test_csv_address_kept_as_given(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("email\n  Jean.Dupont@Example.FR \n", "utf-8")
    (row,) = load_prospects(p)
    assert row.email == "Jean.Dupont@Example.FR"
    assert row.address.key == "jean.dupont@example.fr"
