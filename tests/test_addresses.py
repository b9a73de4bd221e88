"""Address normalisation (SUPP_NORMALISE_ADDRESS), keys, role detection."""

from __future__ import annotations

import hashlib

import idna
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prospect_mailer.addresses import (
    _PLAIN_DOMAIN,
    RoleClassifier,
    address_key,
    domain_key,
    domain_keys_for,
    domain_keys_of,
    lookup_keys,
    mask_address,
    normalise,
)
from prospect_mailer.errors import InvalidAddressError


def test_folding() -> None:
    n = normalise("Jean Dupont <Jean.Dupont@EXAMPLE.fr.>")
    assert n.key == "jean.dupont@example.fr"
    assert n.original == "Jean.Dupont@EXAMPLE.fr."
    assert n.key_hash == hashlib.sha256(b"jean.dupont@example.fr").hexdigest()


def test_idn_domain_to_a_label_and_nfc_local() -> None:
    decomposed = "Jose\u0301@Bücher.example"
    n = normalise(decomposed)
    assert n.domain == "xn--bcher-kva.example"
    assert n.local == "jos\u00e9"
    assert normalise("josé@xn--bcher-kva.example").key == n.key


def test_ss_is_not_folded_to_ss_idna2008() -> None:
    # IDNA2003 (stdlib codec) maps ß to ss; IDNA2008 non-transitional keeps it.
    assert normalise("a@straße.example").domain == "xn--strae-oqa.example"


def test_plus_tags_and_dots_are_kept() -> None:
    assert normalise("a.b+tag@x.example").key == "a.b+tag@x.example"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "empty"),
        ("plain", "no '@'"),
        ("@x.example", "empty local part"),
        ("a@", "empty domain"),
        ("a@localhost", "no dot"),
        ("a b@x.example", "not allowed"),
        ("a@[127.0.0.1]", "literal"),
        ("a..b@x.example", "misplaced dot"),
        ("a@x.example\r\nBcc: v@y.example", "line break"),
        ("x" * 65 + "@x.example", "64 octets"),
        ("a@-bad-.example", "invalid domain"),
        ("<a@x.example", "cannot parse"),
    ],
)
def test_invalid_addresses_name_the_problem(bad: str, message: str) -> None:
    with pytest.raises(InvalidAddressError, match=message) as info:
        normalise(bad)
    assert info.value.address == bad


def test_domain_keys_cover_parents_not_tld() -> None:
    keys = domain_keys_for("Mail.Sales.Example.COM")
    assert keys == [domain_key("mail.sales.example.com"), domain_key("sales.example.com"),
                    domain_key("example.com")]  # fmt: skip
    assert domain_key("example.com") != address_key("x@example.com")


@pytest.mark.parametrize(
    "address",
    ["Ann@Mail.Sales.Example.COM.", "bob@münchen.example.de", "x@XN--MNCHEN-3YA.example", "y@a.fr"],
)
def test_domain_keys_of_a_normalised_address_match_domain_keys_for(address: str) -> None:
    """The send pipeline's shortcut (the address's domain is not normalised again) gives the
    keys :func:`domain_keys_for` gives for the domain as written."""
    a = normalise(address)
    raw_domain = address.rpartition("@")[2]
    assert list(domain_keys_of(a)) == domain_keys_for(raw_domain) == domain_keys_for(a.domain)


def test_lookup_keys_are_each_key_once_in_order_with_each_domains_keys() -> None:
    batch = [normalise(a) for a in ("a@mail.example.com", "b@example.com", "c@Example.COM")]
    keys, domain_keys = lookup_keys(batch)
    assert domain_keys == {
        "mail.example.com": (domain_key("mail.example.com"), domain_key("example.com")),
        "example.com": (domain_key("example.com"),),
    }
    # Three addresses, two domains: example.com's key once, each key where first met.
    a, b, c = (x.key_hash for x in batch)
    assert keys == [a, domain_key("mail.example.com"), domain_key("example.com"), b, c]
    assert lookup_keys([]) == ([], {})


def test_mask() -> None:
    assert mask_address("jean@example.fr") == "j***@example.fr"


def test_role_classifier() -> None:
    rc = RoleClassifier()
    assert rc.is_role(normalise("contact@acme.example"))
    assert rc.is_role(normalise("Info+promo@acme.example"))
    assert not rc.is_role(normalise("contact@gmail.com"))  # a person's freemail box
    assert not rc.is_role(normalise("jean@acme.example"))
    custom = RoleClassifier(extra_names=frozenset({"ventes"}))
    assert custom.is_role(normalise("ventes@acme.example"))
    assert custom.version != rc.version


local_chars = st.characters(
    whitelist_categories=("Ll", "Lu", "Nd"), min_codepoint=48, max_codepoint=0x24F
)
labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzäöüéèß0123456789", min_size=1, max_size=12)


@given(
    local=st.text(local_chars, min_size=1, max_size=20),
    labels=st.lists(labels, min_size=1, max_size=3),
    tld=st.sampled_from(["fr", "com", "example", "de"]),
)
@example(local="A\u0301", labels=["Bücher"], tld="de")
def test_property_normalisation_is_idempotent_and_idn_round_trips(
    local: str, labels: list[str], tld: str
) -> None:
    address = f"{local}@{'.'.join(labels)}.{tld}"
    try:
        n = normalise(address)
    except InvalidAddressError:
        return  # e.g. a label IDNA2008 refuses: refusing clearly is fine
    again = normalise(n.key)
    assert again.key == n.key
    assert again.key_hash == n.key_hash
    # U-label and A-label spellings of the domain give the same key
    import idna

    ulabel = idna.decode(n.domain)
    assert normalise(f"{n.local}@{ulabel}").key == n.key


labels = st.text(alphabet="abcXYZ019-", min_size=1, max_size=70)


@settings(max_examples=5000, deadline=None)
@given(
    st.one_of(
        st.lists(labels, min_size=1, max_size=5).map(".".join),
        st.text(alphabet="aZ9-._é", max_size=30),
        st.integers(min_value=240, max_value=260)
        .map(lambda n: ("a" * 62 + ".") * 5 + "b" * n)
        .map(lambda d: d[: max(1, len(d) - 60)]),
    )
)
@example("a---b.example")  # hyphens in the 3rd and 4th places: idna refuses them
@example("xn--bcher-kva.example")
@example(("a" * 63 + ".") * 3 + "b" * 61)  # 253 characters: the longest name
def test_plain_ascii_domains_skip_idna_with_the_same_result(domain: str) -> None:
    """The fast path takes only names idna accepts unchanged (but for case)."""
    if _PLAIN_DOMAIN.fullmatch(domain):
        assert idna.encode(domain, uts46=True, transitional=False).decode() == domain.lower()
