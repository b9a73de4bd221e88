"""Relay settings (the ``[relay]`` table of the config file) and relay password hashing.

Every setting can also come from the environment with a double underscore between the table and
the key: ``PROSPECT_MAILER_RELAY__LISTEN=0.0.0.0:2525``. Passwords are never stored in clear:
``prospect-mailer relay hash-password`` prints the ``scrypt$...`` string to put in the config.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["RelaySettings", "RelayUser", "hash_password", "parse_listen", "verify_password"]

# scrypt cost: n=2**14, r=8 needs 16 MiB and ~50 ms per check; hashes record their own cost,
# so raising it later keeps old hashes valid.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash ``password`` for the relay config: ``scrypt$n$r$p$salt$hash`` (base64)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: bytes, stored: str) -> bool:
    """``True`` if ``password`` matches ``stored`` (from :func:`hash_password`).

    CPU-bound (tens of milliseconds by design): call it from a worker thread in a server.
    The comparison is constant-time; a malformed ``stored`` value never matches.
    """
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.scrypt(
            password,
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:2525`` for IPv6) into its parts.

    Raises:
        ValueError: no port, or a port outside 0-65535.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must be host:port, e.g. 127.0.0.1:2525, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class RelayUser(BaseModel):
    """One SMTP AUTH account of the relay.

    Attributes:
        username: the login.
        password_hash: from ``prospect-mailer relay hash-password`` (never the password).
        campaign: campaign this account sends for (``id`` or ``id:step``), so that every rule
            runs at ``RCPT TO``; unset: the ``X-Prospect-Campaign`` header or sender mapping.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password_hash: SecretStr
    campaign: str | None = None

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("scrypt$"):
            raise ValueError(
                "must be a hash from `prospect-mailer relay hash-password`, never a password"
            )
        return v


class RelaySettings(BaseModel):
    """Settings of ``prospect-mailer relay`` (the ``[relay]`` table).

    Attributes:
        listen: ``host:port`` to listen on.
        upstream: ``smtp://``, ``smtps://`` or ``smtp+starttls://user:pass@host:port`` to relay
            to; unset: the core ``smtp_url``, else the outbox folder (nothing leaves).
        hostname: the name in the greeting and in generated Message-IDs and DSNs.
        allowed_networks: clients from these CIDRs may relay without AUTH (default loopback).
        users: AUTH accounts (offered only over TLS).
        sender_campaigns: envelope sender address -> campaign (``id`` or ``id:step``).
        campaigns_dir: a folder of campaign TOML files registered when the relay starts.
        tls_cert, tls_key: PEM files; enable STARTTLS (or implicit TLS with ``implicit_tls``).
        implicit_tls: TLS from the first byte (SMTPS, port 465 style) instead of STARTTLS.
        max_message_size: bytes (announced as SIZE; larger messages get 552).
        max_recipients: per message (more get 452 4.5.3).
        max_connections_per_client: simultaneous connections from one IP address.
        command_timeout: seconds a client may stay silent between commands.
        data_timeout: seconds allowed to transfer the message after DATA.
        concurrency: upstream messages in flight for one relayed message.
        shutdown_grace: seconds in-flight transactions get to finish on SIGTERM.
        workers: relay processes sharing the listening socket (one per core to use; see
            :mod:`prospect_mailer.relay_workers`); connection limits are per worker.
        event_loop: ``auto`` (uvloop when installed: ``pip install 'prospect-mailer[fast]'``,
            else asyncio's own), ``asyncio`` or ``uvloop`` (an error if not installed).
        writer: where a SQLite store's send commits (claims, results, their audit records)
            run: ``thread`` (a thread of the relay process), ``process`` (a child process per
            worker, off the event loop's GIL; about 70 MB more memory each; see
            :mod:`prospect_mailer.store.writer_process`) or ``auto`` (the default: ``process``
            with one worker, where it is faster, ``thread`` with several, where two children
            contending for the write lock cost more CPU). No effect on PostgreSQL.
        dkim_key, dkim_selector, dkim_domain: sign every message after injection (needs the
            ``dkim`` extra); ``h=`` always covers List-Unsubscribe and List-Unsubscribe-Post.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:2525"
    upstream: SecretStr | None = None
    hostname: str = "prospect-mailer.localhost"
    allowed_networks: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    users: list[RelayUser] = Field(default_factory=list)
    sender_campaigns: dict[str, str] = Field(default_factory=dict)
    campaigns_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    implicit_tls: bool = False
    max_message_size: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1, le=10_000)
    max_connections_per_client: int = Field(default=20, ge=1)
    command_timeout: float = Field(default=300.0, gt=0)
    data_timeout: float = Field(default=600.0, gt=0)
    concurrency: int = Field(default=8, ge=1, le=256)
    shutdown_grace: float = Field(default=30.0, ge=0)
    workers: int = Field(default=1, ge=1, le=64)
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    writer: Literal["auto", "thread", "process"] = "auto"
    dkim_key: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None

    @property
    def writer_process(self) -> bool:
        """Whether the send commits run in a child process (``writer``, ``auto`` resolved)."""
        return self.writer == "process" or (self.writer == "auto" and self.workers == 1)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return v

    @field_validator("sender_campaigns")
    @classmethod
    def _senders(cls, v: dict[str, str]) -> dict[str, str]:
        # Envelope senders are compared case-insensitively (the domain is; most local parts are).
        return {k.strip().lower(): c for k, c in v.items()}

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The parsed ``allowed_networks``."""
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]

    def user(self, username: str) -> RelayUser | None:
        """The account named ``username``, if any."""
        return next((u for u in self.users if u.username == username), None)
