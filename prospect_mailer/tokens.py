"""Unsubscribe tokens (RFC 8058 §3.1, RULES.md RFC8058_URI_TOKEN).

The HTTPS token is an itsdangerous URL-safe signed payload carrying the recipient key (a hash,
never the address), the suppression scope, the advertiser, the campaign and the page locale.
Keys rotate: the *last* key signs, every key verifies (keep old keys at least a year, RULES.md
OPTOUT_LINK_VALIDITY: tokens never expire).

The mailto token is short because an RFC 5321 local part holds at most 64 octets
(``unsubscribe+TOKEN@``): it names the send (a 10-byte id) and carries a truncated HMAC, in
lower-case base32 since mail systems may fold the case of a local part. It resolves through the
store (the send claim knows the recipient).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from itsdangerous import BadSignature, URLSafeSerializer

from .errors import ConfigError, TokenError

__all__ = ["TOKEN_VERSION", "TokenSigner", "UnsubscribeToken"]

TOKEN_VERSION = 1
_SALT = "prospect-mailer.unsubscribe.v1"
_SHORT_SALT = b"prospect-mailer.mailto.v1"
_MIN_KEY_BYTES = 16
_SHORT_ID_BYTES = 10
_SHORT_MAC_BYTES = 10

Scope = Literal["global", "advertiser", "campaign"]


@dataclass(frozen=True, slots=True)
class UnsubscribeToken:
    """What an unsubscribe token says.

    Attributes:
        recipient_hash: SHA-256 hex of the recipient's canonical address key.
        scope: the suppression scope an unsubscribe writes (default ``advertiser``).
        advertiser_id: the controller on whose behalf the mail was sent.
        campaign_id: the campaign the link came from (for a narrower, optional choice).
        locale: the language of the confirmation page.
    """

    recipient_hash: str
    advertiser_id: str
    campaign_id: str
    scope: Scope = "advertiser"
    locale: str = "fr"


def _canonical_b64(text: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") == text


@lru_cache(maxsize=1024)
def _payload_tail(advertiser_id: str, campaign_id: str, scope: str, locale: str) -> bytes:
    """The token's JSON after ``"r"`` (the same for every recipient of one campaign):
    ``"a":...,"c":...,"s":...,"l":...}``."""
    rest = {"a": advertiser_id, "c": campaign_id, "s": scope, "l": locale}
    return json.dumps(rest, ensure_ascii=False, separators=(",", ":"))[1:].encode("utf-8")


class TokenSigner:
    """Signs and verifies unsubscribe tokens with rotating keys.

    Args:
        keys: secret keys, oldest first; the last one signs, all of them verify. Each must be
            at least 16 bytes.

    Raises:
        ConfigError: no key, or a key that is too short.
    """

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        if not keys:
            raise ConfigError("SECRET_KEY: at least one unsubscribe signing key is required")
        raw = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in keys]
        for i, k in enumerate(raw):
            if len(k) < _MIN_KEY_BYTES:
                raise ConfigError(
                    f"SECRET_KEY: key #{i + 1} is {len(k)} bytes; at least {_MIN_KEY_BYTES} needed"
                )
        self._keys = raw
        self._serializer = URLSafeSerializer(
            raw, salt=_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        # itsdangerous derives the signing key ("django-concat") on every call: once is enough.
        self._signing_key = hashlib.sha256(_SALT.encode() + b"signer" + raw[-1]).digest()

    # -- HTTPS tokens ---------------------------------------------------------------------------

    def make(self, token: UnsubscribeToken) -> str:
        """Return the URL-safe signed token for ``token``.

        The payload is ``{"v","r","a","c","s","l"}`` as compact JSON, signed as itsdangerous'
        ``URLSafeSerializer`` signs it (so :meth:`verify`, which is itsdangerous, reads it), but
        never zlib-compressed: a 43-character random hash leaves little to compress, and
        trying cost a quarter of the token's time. Tokens made compressed (by itsdangerous,
        or by earlier versions) verify all the same.
        """
        raw_hash = bytes.fromhex(token.recipient_hash)
        if len(raw_hash) != 32:
            raise ValueError("recipient_hash must be 64 hex digits")
        data = b'{"v":%d,"r":"%s",%s' % (
            TOKEN_VERSION,
            base64.urlsafe_b64encode(raw_hash)[:43],
            _payload_tail(token.advertiser_id, token.campaign_id, token.scope, token.locale),
        )
        body = base64.urlsafe_b64encode(data).rstrip(b"=")
        mac = hmac.digest(self._signing_key, body, "sha256")
        return (body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode("ascii")

    def verify(self, value: str) -> UnsubscribeToken:
        """Check the signature and return the payload.

        Raises:
            TokenError: forged, altered, truncated, unknown key, or unknown version.
        """
        # base64 has spare bits in its last character: two spellings of one signature would
        # both verify. Accept only the canonical spelling so that *any* changed byte fails.
        _payload, dot, sig = value.rpartition(".")
        if not dot or not _canonical_b64(sig):
            raise TokenError("unsubscribe token signature is not valid")
        try:
            data: Any = self._serializer.loads(value)
        except BadSignature as exc:
            raise TokenError("unsubscribe token signature is not valid") from exc
        except (ValueError, TypeError, UnicodeError) as exc:  # pragma: no cover - defensive
            raise TokenError("unsubscribe token is not readable") from exc
        try:
            if data["v"] != TOKEN_VERSION:
                raise TokenError(f"unsupported token version {data['v']!r}")
            r = str(data["r"])
            recipient_hash = base64.urlsafe_b64decode(r + "=" * (-len(r) % 4)).hex()
            scope = data["s"]
            if scope not in ("global", "advertiser", "campaign") or len(recipient_hash) != 64:
                raise TokenError("unsubscribe token payload is not valid")
            return UnsubscribeToken(
                recipient_hash=recipient_hash,
                advertiser_id=str(data["a"]),
                campaign_id=str(data["c"]),
                scope=scope,
                locale=str(data["l"]),
            )
        except (KeyError, TypeError, binascii.Error, ValueError) as exc:
            if isinstance(exc, TokenError):
                raise
            raise TokenError("unsubscribe token payload is not valid") from exc

    @staticmethod
    def token_id(value: str) -> str:
        """A short fingerprint of a token for the audit log (the token itself is not stored)."""
        return hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]

    # -- short mailto tokens --------------------------------------------------------------------

    def _mac(self, key: bytes, ident: bytes) -> bytes:
        return hmac.new(key, _SHORT_SALT + ident, hashlib.sha256).digest()[:_SHORT_MAC_BYTES]

    def make_short(self, send_id: str) -> str:
        """A short, case-insensitive token for ``send_id`` (the first 20 hex digits are used).

        Fits an RFC 5321 local part: ``unsubscribe+`` + 32 characters.
        """
        ident = bytes.fromhex(send_id[: _SHORT_ID_BYTES * 2])
        if len(ident) != _SHORT_ID_BYTES:
            raise ValueError("send_id must have at least 20 hex digits")
        blob = ident + self._mac(self._keys[-1], ident)
        return base64.b32encode(blob).decode("ascii").lower().rstrip("=")

    def verify_short(self, value: str) -> str:
        """Return the 20-hex-digit send id prefix named by a short token.

        Raises:
            TokenError: not a short token, or its MAC does not verify under any key.
        """
        text = value.strip().upper()
        try:
            blob = base64.b32decode(text + "=" * (-len(text) % 8))
        except (binascii.Error, ValueError) as exc:
            raise TokenError("mailto token is not valid base32") from exc
        if len(blob) != _SHORT_ID_BYTES + _SHORT_MAC_BYTES:
            raise TokenError("mailto token has the wrong length")
        ident, mac = blob[:_SHORT_ID_BYTES], blob[_SHORT_ID_BYTES:]
        if not any(hmac.compare_digest(mac, self._mac(k, ident)) for k in self._keys):
            raise TokenError("mailto token signature is not valid")
        return ident.hex()
