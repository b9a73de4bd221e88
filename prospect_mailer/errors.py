"""Exceptions raised by prospect-mailer.

Every exception the library raises derives from :class:`ProspectMailerError`, so a caller can
catch one type. Leaves also subclass the matching builtin where one exists (as aiosmtplib does),
so ``except ValueError`` or ``except ConnectionError`` keeps working too. Foreign errors
(SQLAlchemy, aiosmtplib, OS errors) are translated at the I/O edge with ``raise ... from exc``.

A *blocked* recipient is never an exception: it is an :class:`~prospect_mailer.models.Outcome`
with ``status="blocked"`` and the rule ids that blocked it.

::

    ProspectMailerError
    ├── ConfigError (ValueError)            bad settings, campaign file or template folder
    ├── InvalidInputError (ValueError)      bad data handed in by a caller
    │   ├── InvalidAddressError             an e-mail address that cannot be normalised
    │   ├── InvalidMessageError             MIME that cannot be processed safely
    │   └── DataFileError                   a bad row or field in a CSV/TOML file (.path, .line)
    ├── TokenError (ValueError)             forged, altered or unreadable unsubscribe token
    ├── StoreError (RuntimeError)           the database failed; mail is not sent unchecked
    └── TransportError (ConnectionError)    the SMTP server or outbox failed
        ├── TransportTemporaryError         4xx / connection trouble: try again later
        └── TransportPermanentError         5xx: the server refused for good
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataFileError",
    "InvalidAddressError",
    "InvalidInputError",
    "InvalidMessageError",
    "ProspectMailerError",
    "StoreError",
    "TokenError",
    "TransportError",
    "TransportPermanentError",
    "TransportTemporaryError",
]


class ProspectMailerError(Exception):
    """Root of every exception raised by prospect-mailer."""


class ConfigError(ProspectMailerError, ValueError):
    """Settings, a campaign file or a template folder is invalid.

    The message names the setting or file and what is wrong with it.
    """


class InvalidInputError(ProspectMailerError, ValueError):
    """Data handed in by a caller is invalid."""


class InvalidAddressError(InvalidInputError):
    """An e-mail address cannot be parsed or normalised.

    Attributes:
        address: the address exactly as given.
    """

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message)
        self.address = address


class InvalidMessageError(InvalidInputError):
    """A MIME message cannot be processed safely (e.g. a header that decodes to CR/LF)."""


class DataFileError(InvalidInputError):
    """A row or field of a data file (CSV prospects, TOML campaign) is invalid.

    Attributes:
        path: the file, as given.
        line: the 1-based line number in the file, or ``None`` for whole-file problems.
        column: the column or key at fault, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        where = path if line is None else f"{path}:{line}"
        if column:
            where = f"{where} [{column}]"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.column = column
        self.reason = message


class TokenError(ProspectMailerError, ValueError):
    """An unsubscribe token is forged, altered, truncated or signed by an unknown key."""


class StoreError(ProspectMailerError, RuntimeError):
    """The store (database) failed. Sends fail closed: nothing goes out unchecked."""


class TransportError(ProspectMailerError, ConnectionError):
    """The transport could not hand the message over.

    Attributes:
        code: the SMTP reply code when there was one, else ``None``.
        reply: the server's reply text or the error description.
    """

    def __init__(self, message: str, *, code: int | None = None, reply: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply or message


class TransportTemporaryError(TransportError):
    """A temporary failure (4xx reply, timeout, connection refused or dropped): retry later."""


class TransportPermanentError(TransportError):
    """A permanent refusal (5xx reply): do not retry this recipient as is."""
