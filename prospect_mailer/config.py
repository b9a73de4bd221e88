"""Settings: environment (``PROSPECT_MAILER_*``), an optional TOML file, then defaults.

Precedence: explicit arguments > environment > TOML file > defaults. The TOML file is
``$PROSPECT_MAILER_CONFIG`` or ``prospect-mailer.toml`` in the working directory when present.
With no configuration at all, mail goes to a local outbox folder and nothing leaves the machine.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .errors import ConfigError
from .relay_config import RelaySettings

__all__ = ["PLACEHOLDER_BASE_URL", "Settings", "load_settings"]

#: Default unsubscribe base URL: fine for the outbox, refused for real SMTP sending.
PLACEHOLDER_BASE_URL = "https://unsubscribe.invalid"


class Settings(BaseSettings):
    """Everything prospect-mailer needs to run.

    Attributes:
        database_url: SQLAlchemy async URL; default a SQLite file in the working directory.
            PostgreSQL: ``postgresql+asyncpg://user@host/db``.
        secret_key: unsubscribe-token signing keys, comma-separated, oldest first (the last
            signs, all verify). When unset, ``secret_key_file`` is used (created on first use).
        base_url: public HTTPS base of the unsubscribe handler; links are
            ``{base_url}/unsubscribe/{token}``.
        smtp_url: ``smtp://``, ``smtps://`` or ``smtp+starttls://user:pass@host:port``; unset
            = write to ``outbox_dir``.
        outbox_dir: where the outbox transport writes ``.eml`` files.
        mailto_domain: domain of the ``unsubscribe+TOKEN@`` address in List-Unsubscribe
            (default: the host of ``base_url``).
        bounce_domain: when set, the envelope sender is ``bounce+TOKEN@bounce_domain`` (VERP),
            so bounces and complaints resolve to the send; unset: the campaign's From.
        template_dirs: folders searched for footer templates before the built-in ones.
        concurrency: messages in flight at once in ``send_many``.
        advertiser_names: advertiser id -> legal name, shown on the unsubscribe page (the token
            carries only the id; without an entry the page shows the id).
        soft_bounce_limit: soft-bounced sends in a row that suppress an address.
        relay: the ``[relay]`` table: settings of ``prospect-mailer relay``.
    """

    model_config = SettingsConfigDict(
        env_prefix="PROSPECT_MAILER_",
        extra="forbid",
        env_ignore_empty=True,
        env_nested_delimiter="__",  # PROSPECT_MAILER_RELAY__LISTEN sets relay.listen
    )

    database_url: str = "sqlite+aiosqlite:///prospect-mailer.db"
    secret_key: SecretStr | None = None
    secret_key_file: Path = Path("prospect-mailer.key")
    base_url: str = PLACEHOLDER_BASE_URL
    smtp_url: SecretStr | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    outbox_dir: Path = Path("outbox")
    mailto_domain: str | None = None
    bounce_domain: str | None = None
    template_dirs: list[Path] = Field(default_factory=list)
    concurrency: int = Field(default=10, ge=1, le=1000)
    role_names: list[str] = Field(default_factory=list)
    advertiser_names: dict[str, str] = Field(default_factory=dict)
    soft_bounce_limit: int = Field(default=3, ge=1, le=100)
    relay: RelaySettings = Field(default_factory=RelaySettings)

    @field_validator("base_url")
    @classmethod
    def _https(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(
                "must be an https:// URL (RFC 8058 one-click needs HTTPS), e.g. "
                "https://unsubscribe.example.com"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v.rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then environment, then the TOML file."""
        toml_path = os.environ.get("PROSPECT_MAILER_CONFIG", "prospect-mailer.toml")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        elif "PROSPECT_MAILER_CONFIG" in os.environ:
            raise ConfigError(f"PROSPECT_MAILER_CONFIG: no such file {toml_path!r}")
        return tuple(sources)

    @property
    def unsubscribe_mailto_domain(self) -> str:
        """The domain for ``unsubscribe+TOKEN@``."""
        return self.mailto_domain or (urlsplit(self.base_url).hostname or "")

    def signing_keys(self) -> list[str]:
        """The signing keys, oldest first; reads or creates ``secret_key_file`` if needed.

        Raises:
            ConfigError: the key file cannot be read or created, or is readable by others.
        """
        if self.secret_key is not None:
            keys = [k.strip() for k in self.secret_key.get_secret_value().split(",") if k.strip()]
            if not keys:
                raise ConfigError("PROSPECT_MAILER_SECRET_KEY is empty")
            return keys
        path = self.secret_key_file
        try:
            if not path.exists():
                # First run: make a key only the owner can read (like an SSH key).
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32) + "\n")
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"{path}: secret key file is readable by others; run chmod 600 {path}"
                )
            keys = [k.strip() for k in path.read_text("utf-8").splitlines() if k.strip()]
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read or create the secret key file: {exc}") from exc
        if not keys:
            raise ConfigError(f"{path}: secret key file is empty")
        return keys


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings`, turning validation errors into a :class:`ConfigError`.

    The message names each setting at fault and its environment variable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"PROSPECT_MAILER_{name.upper()}"
            lines.append(f"{name} ({env}): {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from exc
