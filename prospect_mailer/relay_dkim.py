"""DKIM signing after the compliance step (optional: ``pip install 'prospect-mailer[dkim]'``).

RULES.md RFC8058_DKIM_COVERAGE: one-click unsubscribe needs a valid DKIM signature whose ``h=``
lists ``List-Unsubscribe`` and ``List-Unsubscribe-Post``. Both are *over-signed* (listed once
more than they occur), so a copy appended in transit breaks the signature instead of being
honoured; and after signing, the signature is parsed back and the message refused if either
name is missing from ``h=``, whatever dkimpy's defaults become.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .errors import ConfigError, TransportPermanentError
from .transport import Delivery, Transport, wire_bytes

__all__ = ["COVERED_HEADERS", "DKIMSigner", "DKIMTransport", "signed_headers"]

#: Header names every signature must cover (lower case).
COVERED_HEADERS: tuple[str, ...] = ("list-unsubscribe", "list-unsubscribe-post")


def _dkim() -> Any:
    try:
        import dkim
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("DKIM signing needs dkimpy: pip install 'prospect-mailer[dkim]'") from exc
    return dkim


def signed_headers(signature: bytes) -> list[str]:
    """The ``h=`` list of a ``DKIM-Signature`` header line, lower-cased, in order."""
    value = signature.split(b":", 1)[1]
    unfolded = re.sub(rb"\r?\n[ \t]*", b"", value)
    for tag in unfolded.split(b";"):
        name, _, content = tag.partition(b"=")
        if name.strip() == b"h":
            return [h.strip().decode("ascii").lower() for h in content.split(b":") if h.strip()]
    return []


class DKIMSigner:
    """Signs wire-format messages with one RSA key (relaxed/relaxed canonicalisation).

    Args:
        private_key: the PEM private key.
        selector: the DNS selector (``<selector>._domainkey.<domain>``).
        domain: the signing domain (``d=``).

    Raises:
        ConfigError: dkimpy is not installed.
    """

    def __init__(self, private_key: bytes, *, selector: str, domain: str) -> None:
        self._dkim = _dkim()
        self._key = private_key
        self.selector = selector
        self.domain = domain

    @classmethod
    def from_files(cls, key_path: Path, *, selector: str, domain: str) -> DKIMSigner:
        """Read the key file (at start-up, not in a server hook).

        Raises:
            ConfigError: unreadable key file, or dkimpy missing.
        """
        try:
            key = key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"dkim_key: cannot read {key_path}: {exc.strerror}") from exc
        return cls(key, selector=selector, domain=domain)

    def sign(self, data: bytes) -> bytes:
        """Return the ``DKIM-Signature`` header line (CRLF-terminated) for ``data``.

        CPU-bound: call it from a worker thread in a server.

        Raises:
            TransportPermanentError: signing failed, or ``h=`` misses a covered header
                (RFC8058_DKIM_COVERAGE); the message must not be sent.
        """
        dkim = self._dkim
        signer = dkim.DKIM(data, linesep=b"\r\n")
        names = [n.encode("ascii") for n in COVERED_HEADERS]
        signer.should_sign.update(names)
        signer.add_frozen(names)  # over-sign: one extra h= entry each
        try:
            sig: bytes = signer.sign(
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self._key,
                canonicalize=(b"relaxed", b"relaxed"),
            )
        except dkim.DKIMException as exc:
            raise TransportPermanentError(f"DKIM signing failed: {exc}") from exc
        covered = signed_headers(sig)
        missing = [n for n in COVERED_HEADERS if n not in covered]
        if missing:
            raise TransportPermanentError(
                f"RFC8058_DKIM_COVERAGE: the DKIM signature does not cover {missing}; not sent"
            )
        return sig if sig.endswith(b"\r\n") else sig + b"\r\n"


class DKIMTransport:
    """A transport that DKIM-signs each message, then hands it to ``inner``.

    The signature is computed over the wire bytes, and those exact bytes (signature header
    prepended) are what the inner transport sends, so it stays valid on the wire.
    """

    def __init__(self, inner: Transport, signer: DKIMSigner) -> None:
        self.inner = inner
        self.signer = signer
        self.name = inner.name

    async def send(
        self, message: EmailMessage | bytes, *, sender: str, recipients: Sequence[str]
    ) -> Delivery:
        """Sign ``message`` and send it through the inner transport (as wire bytes).

        Raises:
            TransportPermanentError: signing failed or did not cover the RFC 8058 headers.
            TransportTemporaryError: as the inner transport.
        """
        data = wire_bytes(message)
        signature = await asyncio.to_thread(self.signer.sign, data)
        return await self.inner.send(signature + data, sender=sender, recipients=recipients)

    async def close(self) -> None:
        """Close the inner transport."""
        await self.inner.close()
