"""Unsubscribe tokens: round trip, rotation, tampering."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prospect_mailer.errors import ConfigError, TokenError
from prospect_mailer.tokens import TokenSigner, UnsubscribeToken

H = hashlib.sha256(b"jean@example.fr").hexdigest()
TOK = UnsubscribeToken(recipient_hash=H, advertiser_id="acme", campaign_id="spring", locale="en")


def test_round_trip_and_url_safe() -> None:
    s = TokenSigner(["k" * 32])
    t = s.make(TOK)
    assert all(c.isalnum() or c in "-_." for c in t)
    assert s.verify(t) == TOK
    assert "jean" not in t
    assert H not in t  # the hash is carried in compact form, the address never


def test_rotation_old_tokens_still_verify_new_key_signs() -> None:
    old = TokenSigner(["old-key-0123456789"])
    t_old = old.make(TOK)
    rotated = TokenSigner(["old-key-0123456789", "new-key-0123456789"])
    assert rotated.verify(t_old) == TOK
    t_new = rotated.make(TOK)
    assert t_new != t_old
    with pytest.raises(TokenError):
        old.verify(t_new)
    assert TokenSigner(["new-key-0123456789"]).verify(t_new) == TOK


@given(pos=st.integers(min_value=0), char=st.sampled_from("AbZ09-_."))
@example(pos=-1, char="A").via("spare bits of the last base64 character")
@example(pos=-1, char="b").via("spare bits of the last base64 character")
def test_any_changed_byte_fails(pos: int, char: str) -> None:
    s = TokenSigner(["k" * 32])
    t = s.make(TOK)
    i = pos % len(t)
    forged = t[:i] + char + t[i + 1 :]
    if forged == t:
        return
    with pytest.raises(TokenError):
        s.verify(forged)


@pytest.mark.parametrize("bad", ["", "abc", "a.b", "x" * 500, "é.é"])
def test_garbage_refused(bad: str) -> None:
    with pytest.raises(TokenError):
        TokenSigner(["k" * 32]).verify(bad)


def test_truncated_refused() -> None:
    s = TokenSigner(["k" * 32])
    t = s.make(TOK)
    for cut in (1, 5, len(t) // 2):
        with pytest.raises(TokenError):
            s.verify(t[:-cut])


def test_short_keys_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        TokenSigner(["short"])
    with pytest.raises(ConfigError):
        TokenSigner([])


def test_short_mailto_token() -> None:
    s = TokenSigner(["k" * 32])
    send_id = "0123456789abcdef0123456789abcdef"
    short = s.make_short(send_id)
    assert len("unsubscribe+" + short) <= 64
    assert short == short.lower()
    assert s.verify_short(short) == send_id[:20]
    assert s.verify_short(short.upper()) == send_id[:20]  # case folded by a mail system
    forged = ("a" if short[0] != "a" else "b") + short[1:]
    with pytest.raises(TokenError):
        s.verify_short(forged)
    with pytest.raises(TokenError):
        TokenSigner(["z" * 32]).verify_short(short)
    with pytest.raises(TokenError):
        s.verify_short("!!")


def test_token_id_is_not_the_token() -> None:
    t = TokenSigner(["k" * 32]).make(TOK)
    assert TokenSigner.token_id(t) not in t
    assert len(TokenSigner.token_id(t)) == 16


def test_last_character_spare_bits_refused() -> None:
    """Regression: base64's spare bits gave two spellings of one signature."""
    s = TokenSigner(["k" * 32])
    t = s.make(TOK)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    idx = alphabet.index(t[-1])
    for other in alphabet[idx & ~3 : (idx & ~3) + 4]:
        if other != t[-1]:
            with pytest.raises(TokenError):
                s.verify(t[:-1] + other)


@settings(max_examples=500)
@given(
    recipient=st.binary(min_size=32, max_size=32),
    advertiser=st.text(min_size=1, max_size=60),
    campaign=st.text(min_size=1, max_size=60),
    scope=st.sampled_from(["global", "advertiser", "campaign"]),
    locale=st.sampled_from(["fr", "en", "de"]),
    keys=st.lists(st.binary(min_size=16, max_size=40), min_size=1, max_size=3),
)
@example(b"\0" * 32, "a" * 60, "a" * 60, "advertiser", "fr", [b"k" * 16])  # compresses well
def test_tokens_are_what_itsdangerous_signs_and_reads(
    recipient: bytes,
    advertiser: str,
    campaign: str,
    scope: str,
    locale: str,
    keys: list[bytes],
) -> None:
    """make() builds the token itself (faster): itsdangerous reads it back as this payload,
    and it is itsdangerous' own token except that it is never compressed. A compressed token
    (itsdangerous', or one made by earlier versions) verifies just the same."""
    signer = TokenSigner(keys)
    token = UnsubscribeToken(
        recipient_hash=recipient.hex(),
        advertiser_id=advertiser,
        campaign_id=campaign,
        scope=scope,  # type: ignore[arg-type]
        locale=locale,
    )
    made = signer.make(token)
    assert signer.make(token) == made  # the cached JSON tail gives the same bytes
    payload = {
        "v": 1,
        "r": base64.urlsafe_b64encode(recipient).decode("ascii").rstrip("="),
        "a": advertiser,
        "c": campaign,
        "s": scope,
        "l": locale,
    }
    assert signer._serializer.loads(made) == payload
    theirs = signer._serializer.dumps(payload)
    if not theirs.startswith("."):  # itsdangerous did not compress: the very same bytes
        assert made == theirs
    assert not made.startswith(".")
    assert signer.verify(made) == token
    assert signer.verify(theirs) == token


def test_a_recipient_hash_that_is_not_sha256_is_refused() -> None:
    signer = TokenSigner(["k" * 32])
    with pytest.raises(ValueError, match="64 hex digits"):
        signer.make(
            UnsubscribeToken(recipient_hash="ab" * 31, advertiser_id="acme", campaign_id="c")
        )
