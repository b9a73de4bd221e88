"""Settings: defaults, environment, TOML file, clear errors, the secret key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prospect_mailer.config import PLACEHOLDER_BASE_URL, load_settings
from prospect_mailer.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PROSPECT_MAILER_") and name != "PROSPECT_MAILER_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_need_no_configuration() -> None:
    s = load_settings()
    assert s.database_url == "sqlite+aiosqlite:///prospect-mailer.db"
    assert s.smtp_url is None
    assert s.outbox_dir == Path("outbox")
    assert s.base_url == PLACEHOLDER_BASE_URL


def test_environment_wins_over_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "prospect-mailer.toml").write_text(
        'base_url = "https://from-file.example"\nconcurrency = 3\n', "utf-8"
    )
    monkeypatch.setenv("PROSPECT_MAILER_BASE_URL", "https://from-env.example/")
    s = load_settings()
    assert s.base_url == "https://from-env.example"  # trailing slash dropped
    assert s.concurrency == 3
    assert s.unsubscribe_mailto_domain == "from-env.example"


def test_config_path_from_env_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROSPECT_MAILER_CONFIG", "nope.toml")
    with pytest.raises(ConfigError, match=r"no such file 'nope\.toml'"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PROSPECT_MAILER_BASE_URL", "http://insecure.example", "https://"),
        ("PROSPECT_MAILER_BASE_URL", "https://x.example/?a=1", "query"),
        ("PROSPECT_MAILER_CONCURRENCY", "0", "CONCURRENCY"),
        ("PROSPECT_MAILER_CONCURRENCY", "many", "CONCURRENCY"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings()
    assert name in str(info.value)


def test_unknown_key_in_toml_is_refused(tmp_path: Path) -> None:
    (tmp_path / "prospect-mailer.toml").write_text('base_ulr = "https://typo.example"\n', "utf-8")
    with pytest.raises(ConfigError, match="base_ulr"):
        load_settings()


def test_secret_keys_from_env_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROSPECT_MAILER_SECRET_KEY", "old-key-0123456789, new-key-0123456789")
    assert load_settings().signing_keys() == ["old-key-0123456789", "new-key-0123456789"]


def test_secret_key_file_created_private_and_reused(tmp_path: Path) -> None:
    s = load_settings()
    first = s.signing_keys()
    path = tmp_path / "prospect-mailer.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_settings().signing_keys() == first
    assert len(first[0]) >= 32


def test_secret_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prospect-mailer.key"
    path.write_text("k" * 40 + "\n", "utf-8")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_settings().signing_keys()


def test_secret_key_file_empty_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prospect-mailer.key"
    path.write_text("\n", "utf-8")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="empty"):
        load_settings().signing_keys()
