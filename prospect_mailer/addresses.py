"""E-mail address normalisation, hashing and role-address detection (pure, no I/O).

One normalisation is used everywhere (RULES.md SUPP_NORMALISE_ADDRESS):

* strip the display name, angle brackets and surrounding white space;
* split at the *last* ``@``;
* domain: IDNA2008 / UTS#46 A-label via the ``idna`` package (the stdlib ``idna`` codec is
  IDNA2003), lower case, no trailing dot;
* local part: Unicode NFC, then lower case.

The folded form is only a *key* used for suppression and idempotency. Mail is sent to the
address as given. Over-matching (treating ``Bob@`` and ``bob@`` as one person) is the safe
failure for a suppression list.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import parseaddr

import idna

from .errors import InvalidAddressError

__all__ = [
    "FREEMAIL_DOMAINS",
    "RFC2142_ROLE_NAMES",
    "NormalisedAddress",
    "RoleClassifier",
    "address_key",
    "domain_key",
    "domain_keys_for",
    "domain_keys_of",
    "lookup_keys",
    "mask_address",
    "normalise",
    "normalise_domain",
    "normalise_recent",
]

#: Mailbox names of RFC 2142 plus the common French and English role names.
RFC2142_ROLE_NAMES: frozenset[str] = frozenset(
    {
        # RFC 2142 sections 3-5
        "info", "marketing", "sales", "support", "abuse", "noc", "security",
        "postmaster", "hostmaster", "usenet", "news", "webmaster", "www", "uucp", "ftp",
        # common role mailboxes (English)
        "contact", "hello", "office", "admin", "billing", "accounts", "accounting",
        "orders", "enquiries", "inquiries", "hr", "jobs", "careers", "press", "media",
        "team", "service", "customerservice", "help", "reception", "purchasing",
        # common role mailboxes (French)
        "commande", "commandes", "compta", "comptabilite", "direction", "accueil",
        "secretariat", "achats", "recrutement", "rh", "facturation", "devis", "bonjour",
    }
)  # fmt: skip

#: Consumer mailbox providers: a role-looking name there is a private person's mailbox.
FREEMAIL_DOMAINS: frozenset[str] = frozenset(
    {
        "gmail.com", "googlemail.com", "yahoo.com", "yahoo.fr", "hotmail.com", "hotmail.fr",
        "outlook.com", "outlook.fr", "live.com", "live.fr", "msn.com", "icloud.com", "me.com",
        "aol.com", "orange.fr", "wanadoo.fr", "free.fr", "sfr.fr", "laposte.net", "gmx.fr",
        "gmx.com", "gmx.de", "web.de", "proton.me", "protonmail.com", "bbox.fr", "neuf.fr",
    }
)  # fmt: skip

_MAX_LOCAL = 64
_MAX_ADDRESS = 254
# Characters never valid in an address we send to: controls (incl. CR/LF), space, and the
# specials that would let an address break out of a header or an SMTP command.
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>()\[\]\\,;:\"]")


@dataclass(frozen=True, slots=True)
class NormalisedAddress:
    """An address checked and folded once, by :func:`normalise` (build it there: its key and
    its domain keys are computed from these fields as they are).

    Attributes:
        original: the addr-spec as given (display name and brackets removed); what is sent to.
        local: the folded local part (NFC, lower case).
        domain: the folded domain (IDNA2008 A-label, lower case, no trailing dot).
    """

    original: str
    local: str
    domain: str
    #: Lower-case hex SHA-256 of the UTF-8 key (the suppression exchange format); computed
    #: once, as every store query of a send reads it.
    key_hash: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.key.encode("utf-8")).hexdigest()
        object.__setattr__(self, "key_hash", digest)

    @property
    def key(self) -> str:
        """The canonical key ``local@domain`` (A-label)."""
        return f"{self.local}@{self.domain}"

    @property
    def domain_hash(self) -> str:
        """Lower-case hex SHA-256 of ``@`` + the A-label domain."""
        return domain_key(self.domain)

    @property
    def masked(self) -> str:
        """A masked form for logs and audit (``j***@example.com``)."""
        return mask_address(self)


def normalise_domain(domain: str, *, where: str | None = None) -> str:
    """Return the IDNA2008/UTS#46 A-label form of ``domain``, lower-cased, without trailing dot.

    Raises:
        InvalidAddressError: the domain is empty or not a valid IDNA2008 name.
    """
    raw = domain
    d = domain.strip().rstrip(".")
    if not d:
        raise InvalidAddressError("empty domain", address=where or raw)
    if d.startswith("[") or _looks_like_ip(d):
        raise InvalidAddressError(
            f"address literal domains are not accepted: {raw!r}", address=where or raw
        )
    try:
        alabel = _alabel(d)
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidAddressError(f"invalid domain {raw!r}: {exc}", address=where or raw) from exc
    if "." not in alabel:
        raise InvalidAddressError(
            f"domain {raw!r} has no dot; a public mail domain is expected", address=where or raw
        )
    return alabel


#: An ASCII host name whose labels are letters, digits and inner hyphens, none with hyphens
#: in its 3rd and 4th places (``xn--`` A-labels and other reserved forms go to ``idna``): its
#: IDNA2008/UTS#46 A-label is itself, lower-cased (property-tested against ``idna``).
_PLAIN_DOMAIN = re.compile(
    r"(?!.{254})(?:(?![^.]{2}--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"(?![^.]{2}--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


@functools.lru_cache(maxsize=16384)
def _alabel(domain: str) -> str:
    # IDNA2008 with UTS#46 mapping costs ~10 µs a call (30 on a slow machine): plain ASCII
    # names skip it. Mail goes to few distinct domains (the relay normalises every RCPT, a
    # B2B list repeats each company's): a pure function of its argument, so memoised.
    if _PLAIN_DOMAIN.fullmatch(domain):
        return domain.lower()
    return idna.encode(domain, uts46=True, transitional=False).decode("ascii").lower()


def _looks_like_ip(d: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", d))


def normalise(address: str) -> NormalisedAddress:
    """Check and fold an address.

    Accepts ``addr@example.com``, ``<addr@example.com>`` and ``Name <addr@example.com>``.

    Raises:
        InvalidAddressError: the message says what is wrong (missing ``@``, bad domain,
            forbidden character, too long...).
    """
    if not isinstance(address, str):
        raise InvalidAddressError(
            f"address must be a string, not {type(address).__name__}", address=repr(address)
        )
    given = address
    if "\r" in given or "\n" in given or "\x00" in given:
        raise InvalidAddressError("address contains a line break or NUL", address=given)
    text = given.strip()
    if "<" in text or ">" in text:
        _name, spec = parseaddr(text)
        if not spec or text.count("<") != 1 or not text.endswith(">"):
            raise InvalidAddressError(f"cannot parse address {given!r}", address=given)
        text = spec.strip()
    if not text:
        raise InvalidAddressError("empty address", address=given)
    if "@" not in text:
        raise InvalidAddressError(f"address {given!r} has no '@'", address=given)
    local, _, domain = text.rpartition("@")
    if not local:
        raise InvalidAddressError(f"address {given!r} has an empty local part", address=given)
    if _FORBIDDEN.search(local) or "@" in local:
        raise InvalidAddressError(
            f"address {given!r} has a character not allowed in a local part", address=given
        )
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise InvalidAddressError(f"address {given!r} has a misplaced dot", address=given)
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise InvalidAddressError(f"local part of {given!r} exceeds 64 octets", address=given)
    folded_domain = normalise_domain(domain, where=given)
    folded_local = unicodedata.normalize("NFC", local).lower()
    if len(folded_local.encode("utf-8")) + 1 + len(folded_domain) > _MAX_ADDRESS:
        raise InvalidAddressError(f"address {given!r} exceeds 254 octets", address=given)
    return NormalisedAddress(original=text, local=folded_local, domain=folded_domain)


#: :func:`normalise` with its recent results kept (4,096): one send normalises the same
#: address several times (registry lookup, model validation, ``prospect.address``), and IDNA
#: is not free. Results are immutable; a bad address raises each time (nothing is cached).
normalise_recent = functools.lru_cache(maxsize=4096)(normalise)


def address_key(address: str) -> str:
    """SHA-256 hex of the canonical key of ``address`` (see :func:`normalise`)."""
    return normalise(address).key_hash


def domain_key(domain: str) -> str:
    """SHA-256 hex of ``@`` + the A-label form of ``domain``.

    The ``@`` prefix keeps domain keys apart from address keys in one hashed namespace.
    """
    return hashlib.sha256(("@" + normalise_domain(domain)).encode("ascii")).hexdigest()


def domain_keys_for(domain: str, *, include_parents: bool = True) -> list[str]:
    """Domain keys to look up for ``domain``: itself and, optionally, each parent domain.

    ``mail.sales.example.com`` gives keys for ``mail.sales.example.com``,
    ``sales.example.com`` and ``example.com`` (never the bare TLD), so an objection filed for
    a company's domain also covers its subdomains.
    """
    return list(_domain_keys(normalise_domain(domain), include_parents))


def domain_keys_of(address: NormalisedAddress) -> tuple[str, ...]:
    """:func:`domain_keys_for` the domain of ``address`` and its parents, without normalising
    the domain again (it is already): about 0.15 µs against 1 µs, for each recipient of a
    batch (the send pipeline's suppression check)."""
    return _domain_keys(address.domain, True)


def lookup_keys(
    addresses: Iterable[NormalisedAddress],
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """What a suppression check of ``addresses`` looks up: every address key and every key of
    their domains (and parents), once each, in the order first met (an address's key, then
    its domain's keys when the domain is new); and each domain's keys, to match the hits back
    to each address (its own key, then ``domain_keys[address.domain]``)."""
    keys: dict[str, None] = {}
    domain_keys: dict[str, tuple[str, ...]] = {}
    for a in addresses:
        keys[a.key_hash] = None
        if a.domain not in domain_keys:
            found = domain_keys[a.domain] = domain_keys_of(a)
            for key in found:
                keys[key] = None
    return list(keys), domain_keys


@functools.lru_cache(maxsize=4096)
def _domain_keys(d: str, include_parents: bool) -> tuple[str, ...]:
    # Most domains have no parent to add (``acme.fr``): one hash, no list. A parent's key
    # comes from the cache (``co.uk`` is hashed once, not for every ``*.co.uk``).
    key = hashlib.sha256(b"@" + d.encode("ascii")).hexdigest()
    if not include_parents or d.count(".") < 2:
        return (key,)
    labels = d.split(".")
    return (key, *[_domain_keys(".".join(labels[i:]), False)[0] for i in range(1, len(labels) - 1)])


def mask_address(address: NormalisedAddress | str) -> str:
    """Masked form for audit records: first character of the local part, then ``***``."""
    n = address if isinstance(address, NormalisedAddress) else normalise(address)
    return f"{n.local[:1]}***@{n.domain}"


@dataclass(frozen=True, slots=True)
class RoleClassifier:
    """Heuristic classifier for generic role addresses (FR_GENERIC_ROLE_ADDRESS).

    A role address is a mailbox name from RFC 2142 (or the configured extra list) at a domain
    that is not a consumer mailbox provider. It may only relax the consent check, never the
    identity, opt-out or suppression rules.
    """

    VERSION = "role-v1"

    extra_names: frozenset[str] = frozenset()
    extra_freemail: frozenset[str] = frozenset()

    def is_role(self, address: NormalisedAddress) -> bool:
        """True if ``address`` looks like a generic role mailbox of an organisation."""
        name = address.local.split("+", 1)[0]
        if address.domain in FREEMAIL_DOMAINS or address.domain in self.extra_freemail:
            return False
        return name in RFC2142_ROLE_NAMES or name in self.extra_names

    @property
    def version(self) -> str:
        """Classifier version recorded in the audit log."""
        extra = len(self.extra_names) + len(self.extra_freemail)
        return self.VERSION if not extra else f"{self.VERSION}+{extra}"
