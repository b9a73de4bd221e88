"""Prospect registry: the prospect file, keyed by the hash of the address."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from prospect_mailer.addresses import normalise
from prospect_mailer.errors import StoreError
from prospect_mailer.models import Prospect
from prospect_mailer.store import Store


def _prospect(email: str, **fields: object) -> Prospect:
    return Prospect.model_validate({"email": email, **fields})


async def test_upsert_get_replace_delete(store: Store) -> None:
    reg = store.prospects
    jane = _prospect(
        "Jane.Doe@Example.com",
        name="Jane Doe",
        recipient_type="professional",
        job_function="purchasing",
        collected_at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        consent_advertisers=("acme",),
    )
    await reg.upsert(jane)
    assert await reg.get("jane.doe@example.com") == jane
    assert await reg.get("<JANE.DOE@example.com>") == jane
    assert await reg.get("nobody@example.com") is None
    renamed = jane.model_copy(update={"name": "Jane D."})
    await reg.upsert(renamed)
    assert await reg.count() == 1
    assert (await reg.get("jane.doe@example.com")) == renamed
    key = normalise("jane.doe@example.com").key_hash
    assert await reg.delete(key)
    assert not await reg.delete(key)
    assert await reg.count() == 0


async def test_upsert_many_last_wins_and_get_many(store: Store) -> None:
    reg = store.prospects
    people = [_prospect(f"p{i}@example.com", name=f"P{i}") for i in range(1100)]
    people.append(_prospect("P5@EXAMPLE.com", name="Five again"))
    assert await reg.upsert_many(people) == 1100
    assert await reg.count() == 1100
    keys = [normalise(f"p{i}@example.com").key_hash for i in (5, 6, 1099)] + ["0" * 64]
    found = await reg.get_many(keys)
    assert set(found) == set(keys[:3])
    assert found[keys[0]].name == "Five again"
    assert await reg.upsert_many([]) == 0


async def test_unreadable_row_raises_store_error(store: Store) -> None:
    await store.prospects.upsert(_prospect("x@example.com"))
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE prospects SET data = '{\"email\": 3}'"))
    with pytest.raises(StoreError, match="unreadable"):
        await store.prospects.get("x@example.com")
