"""SMTP AUTH for the relay: PLAIN and LOGIN against the hashed passwords of the settings.

Offered only over TLS (STARTTLS or implicit TLS; aiosmtpd answers ``538 5.7.11`` otherwise).
aiosmtpd's own mechanisms call a synchronous authenticator; these are its ``auth_*`` handler
hooks instead, so that the deliberately slow password hash runs in a worker thread and never
blocks the event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiosmtpd.smtp import AuthResult

from .relay_config import RelaySettings, verify_password

if TYPE_CHECKING:
    from .relay import RelaySession

__all__ = ["RelayAuth"]


class RelayAuth:
    """Mixin for the relay handler: ``auth_PLAIN`` and ``auth_LOGIN`` hooks."""

    settings: RelaySettings

    async def auth_PLAIN(self, server: RelaySession, args: list[str]) -> AuthResult:
        """RFC 4616 PLAIN, checked against the hashed passwords of the settings."""
        blob = await server.read_auth_response(args[1] if len(args) > 1 else None, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, server: RelaySession, args: list[str]) -> AuthResult:
        """The LOGIN mechanism (user name, then password, base64)."""
        login = await server.read_auth_response(args[1] if len(args) > 1 else None, "User Name\x00")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.read_auth_response(None, "Password\x00")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        name = login.decode("utf-8", "replace")
        user = self.settings.user(name)
        stored = user.password_hash.get_secret_value() if user else _DUMMY_HASH
        # scrypt takes tens of milliseconds: off the event loop. An unknown user costs the
        # same, so timing does not reveal which logins exist.
        ok = await asyncio.to_thread(verify_password, password, stored) and user is not None
        return AuthResult(success=ok, handled=False, auth_data=name if ok else None)


_DUMMY_HASH = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
