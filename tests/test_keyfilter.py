"""The suppression key filter: it screens lookups, and never hides a listed key.

Every way an entry can reach the list behind a filter's back is tried here on a real SQLite
file: another process inserting (the next id), an id reused after the highest entry was
deleted, an id set by hand below the others, a key changed in place, a large import, the
state's trigger dropped by hand, an old schema migrated. After each, the very next lookup
must find the entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest
from store_fixtures import behind_the_stores_back

from prospect_mailer.errors import StoreError
from prospect_mailer.store import Store, fastread
from prospect_mailer.store.fastread import CATCH_UP_MAX
from prospect_mailer.store.keyfilter import BITS_PER_ENTRY, SCHEME, KeyFilter, build_filter

pytestmark = pytest.mark.filterwarnings("error")


def _hashes(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def _insert(path: Path, key: str, row_id: int | None = None) -> None:
    """Insert an entry as another program would, through its own connection."""
    behind_the_stores_back(
        path,
        "INSERT INTO suppression (id, kind, key_hash, scope, scope_value, reason, source, "
        f"created_at) VALUES ({'NULL' if row_id is None else row_id}, 'address', '{key}', "
        "'global', '', 'manual', 'other-process', '2026-12-01T00:00:00+00:00')",
    )


def _epoch(path: Path) -> str:
    con = sqlite3.connect(path)
    try:
        return str(con.execute("SELECT epoch FROM suppression_state").fetchone()[0])
    finally:
        con.close()


def _state(path: Path) -> tuple[int, int]:
    con = sqlite3.connect(path)
    try:
        high, misordered = con.execute("SELECT high, misordered FROM suppression_state").fetchone()
        return int(high), int(misordered)
    finally:
        con.close()


async def _add(store: Store, keys: list[str]) -> None:
    """List ``keys`` (global address entries from a feed)."""
    await store.suppression.add_hashes(
        keys, kind="address", scope="global", scope_value="", reason="import", source="feed"
    )


async def _filled(path: Path, n: int = 3000) -> tuple[Store, list[str]]:
    """A store with ``n`` entries and its key filter built."""
    store = await Store.open(path)
    keys = _hashes(n, "listed")
    await _add(store, keys)
    assert await store.suppression.prepare()
    return store, keys


def test_filter_keeps_every_key_added_and_passes_few_others() -> None:
    entries = 200_000
    listed = _hashes(entries, "in")
    screen = KeyFilter(entries, high=entries, misordered=0)
    assert screen.bits_count == BITS_PER_ENTRY * entries
    screen.add(listed)
    assert screen.candidates(listed) == listed  # never a false negative, order kept
    absent = _hashes(entries, "out")
    passed = len(screen.candidates(absent))
    assert 0 < passed < 0.006 * entries  # about 0.3% at 20 bits an entry
    assert not screen.full
    screen.add(_hashes(entries // 2 + 1, "more"))
    assert screen.full  # grown by more than half: the reader builds a bigger one


def test_a_key_that_is_not_hex_is_always_a_candidate() -> None:
    screen = KeyFilter(10, high=0, misordered=0)
    screen.add(["not hex at all!!", "0123"])  # a stored odd key is skipped, never an error
    assert screen.candidates(["not hex at all!!", "zz", ""]) == ["not hex at all!!", "zz", ""]
    assert screen.candidates(["0123"]) == ["0123"]


async def test_a_build_in_stretches_holds_every_stored_key(tmp_path: Path) -> None:
    """Stretches that end inside a run of equal prefixes, and stored keys that are not 16
    hex digits (written by hand: the store refuses them), read row by row."""
    path = tmp_path / "pm.db"
    async with Store.connect(path, key_filter=False) as store:
        shared = ["0123456789abcdef" + c * 48 for c in "abcdef0123"]  # one prefix, 10 keys
        await _add(store, [*_hashes(100), *shared])
    for odd in ("short", "NOT HEX AT ALL, but long enough", "ab cd ef 01 23 45 67 89"):
        _insert(path, odd)
    con = sqlite3.connect(path)
    try:
        stored = [row[0] for row in con.execute("SELECT key_hash FROM suppression")]
        for stretch in (7, 10, 1000):
            built = build_filter(con, stretch=stretch)
            assert built is not None
            assert built.high == 113
            assert built.candidates(stored) == stored
            assert len(built.candidates(_hashes(1000, "absent"))) < 10
        stop = threading.Event()
        stop.set()
        assert build_filter(con, stop, stretch=7) is None
    finally:
        con.close()


async def test_screened_lookups_find_the_listed_keys_and_skip_sqlite_for_the_others(
    tmp_path: Path,
) -> None:
    store, keys = await _filled(tmp_path / "pm.db")
    try:
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is not None
        statements: list[str] = []
        reader.set_trace(statements.append)
        absent = _hashes(2000, "absent")
        batch = [*absent[:1000], *keys[:20], *absent[1000:]]
        found = await store.suppression.lookup(batch)
        assert set(found) == set(keys[:20])
        single = await store.suppression.lookup([keys[7]])
        assert list(single) == [keys[7]]
        assert await store.suppression.lookup(absent[:3]) == {}
        # The state is read before each use of the filter, by the batch only (a few keys
        # go to SQLite directly), and the batch's absent keys never reach the index: only
        # its candidates (20 listed keys and a few false positives) are looked up.
        lookups = [
            s
            for s in statements
            if "FROM suppression " in s and "IN (" in s and "suppression_state" not in s
        ]
        assert sum("suppression_state" in s for s in statements) == 1
        assert len(lookups) == 3
        assert 20 <= lookups[0].count("'") // 2 < 40
    finally:
        await store.close()


async def test_an_entry_added_by_another_process_is_found_at_the_next_lookup(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pm.db"
    store, _ = await _filled(path)
    other = await Store.open(path, key_filter=False)
    try:
        batch = _hashes(500, "absent")
        new = _hashes(3, "new")
        _insert(path, new[0])
        await other.suppression.add_hashes(
            new[1:], kind="address", scope="advertiser", scope_value="acme",
            reason="unsubscribe", source="web",
        )  # fmt: skip
        assert set(await store.suppression.lookup([*batch, *new])) == set(new)
        assert list(await store.suppression.lookup([new[0]])) == [new[0]]
        screen = store.suppression.reader.key_filter  # type: ignore[union-attr]
        assert screen is not None
        assert screen.high == _state(path)[0]
    finally:
        await other.close()
        await store.close()


@pytest.mark.parametrize("how", ["reused id", "id set by hand", "key changed"])
async def test_an_entry_the_ids_cannot_account_for_drops_the_filter(
    tmp_path: Path, how: str
) -> None:
    """An insert whose id is not above every id before it (SQLite reuses the highest id once
    that entry is deleted; a program may set one), or a key changed in place: the filter
    cannot be told by id, so it is dropped and built again; the lookup meanwhile goes to
    SQLite and finds the entry."""
    path = tmp_path / "pm.db"
    store, _keys = await _filled(path)
    try:
        high, misordered = _state(path)
        new = _hashes(1, how)[0]
        if how == "reused id":
            behind_the_stores_back(path, f"DELETE FROM suppression WHERE id = {high}")
            _insert(path, new)
        elif how == "id set by hand":
            behind_the_stores_back(path, "DELETE FROM suppression WHERE id = 5")
            _insert(path, new, row_id=5)
        else:
            behind_the_stores_back(path, f"UPDATE suppression SET key_hash = '{new}' WHERE id = 9")
        assert _state(path) == (high, misordered + 1)
        batch = [*_hashes(300, "absent"), new]
        assert list(await store.suppression.lookup(batch)) == [new]
        assert list(await store.suppression.lookup([new])) == [new]
        # Rebuilt beside, at the new state; it holds the entry too.
        assert await store.suppression.prepare()
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is not None
        assert reader.key_filter.misordered == misordered + 1
        assert list(await store.suppression.lookup(batch)) == [new]
    finally:
        await store.close()


async def test_a_large_import_meanwhile_rebuilds_the_filter(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    store, _ = await _filled(path, 100)
    try:
        reader = store.suppression.reader
        assert reader is not None
        built = reader.key_filter
        imported = _hashes(CATCH_UP_MAX + 1, "import")
        con = sqlite3.connect(path)
        con.executemany(
            "INSERT INTO suppression (kind, key_hash, scope, scope_value, reason, source, "
            "created_at) VALUES ('address', ?, 'global', '', 'import', 'feed', "
            "'2026-12-01T00:00:00+00:00')",
            [(k,) for k in imported],
        )
        con.commit()
        con.close()
        batch = [*_hashes(100, "absent"), imported[0], imported[-1]]
        assert set(await store.suppression.lookup(batch)) == {imported[0], imported[-1]}
        assert await store.suppression.prepare()
        assert reader.key_filter is not built
        assert reader.key_filter is not None
        assert reader.key_filter.high == _state(path)[0]
        assert set(await store.suppression.lookup(batch)) == {imported[0], imported[-1]}
    finally:
        await store.close()


async def test_an_unreadable_state_drops_the_filter_and_sqlite_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pm.db"
    store, keys = await _filled(path)
    try:
        reader = store.suppression.reader
        assert reader is not None
        behind_the_stores_back(path, "DROP TRIGGER suppression_state_insert_v2")
        behind_the_stores_back(path, "DROP TABLE suppression_state")
        new = _hashes(1, "new")[0]
        _insert(path, new)  # uncounted: nothing counts any more
        batch = [keys[0], new, *_hashes(100, "absent")]
        assert set(await store.suppression.lookup(batch)) == {keys[0], new}
        assert reader.key_filter is None
        assert "its state cannot be read" in caplog.text
        assert not await store.suppression.prepare()  # no state: nothing to build from
        assert set(await store.suppression.lookup(batch)) == {keys[0], new}
        # And a store that cannot be read at all fails the lookup (the caller fails closed).
        behind_the_stores_back(path, "DROP TABLE suppression")
        with pytest.raises(StoreError, match="suppression lookup failed"):
            await store.suppression.lookup(batch)
    finally:
        await store.close()


async def test_a_trigger_dropped_while_running_stops_the_filter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The state is read with its triggers: once one is gone, inserts go uncounted, so the
    filter in use is dropped and no new one is built until the store is opened again."""
    path = tmp_path / "pm.db"
    store, keys = await _filled(path)
    try:
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is not None
        behind_the_stores_back(path, "DROP TRIGGER suppression_state_insert_v2")
        uncounted = _hashes(1, "uncounted")[0]
        _insert(path, uncounted)
        assert _state(path) == (3000, 0)  # the state does not know of it
        batch = [*_hashes(200, "absent"), uncounted, keys[1]]
        assert set(await store.suppression.lookup(batch)) == {uncounted, keys[1]}
        assert reader.key_filter is None
        assert "trigger keeping suppression_state is missing" in caplog.text
        assert not await store.suppression.prepare()
        assert set(await store.suppression.lookup(batch)) == {uncounted, keys[1]}
    finally:
        await store.close()


async def test_a_dropped_trigger_is_recreated_and_the_filters_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pm.db"
    store, keys = await _filled(path, 10)  # a filter saved at the state before
    await store.close()
    epoch = _epoch(path)
    behind_the_stores_back(path, "DROP TRIGGER suppression_state_insert_v2")
    uncounted = _hashes(1, "uncounted")[0]
    _insert(path, uncounted)  # no trigger: the state does not know of it
    assert _state(path) == (10, 0)
    async with Store.connect(path) as store:
        assert _state(path) == (11, 0)
        assert _epoch(path) != epoch  # the saved filter is not loaded: built again
        assert "suppression_state triggers were missing" in caplog.text
        assert await store.suppression.prepare()
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is not None
        assert reader.key_filter.origin == "built"
        batch = [*_hashes(100, "absent"), uncounted, keys[3]]
        assert set(await store.suppression.lookup(batch)) == {uncounted, keys[3]}
        _insert(path, _hashes(1, "counted")[0])
    assert _state(path) == (12, 0)


async def test_a_version_3_store_gets_its_state_from_the_highest_id(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    async with Store.connect(path) as store:
        await _add(store, _hashes(40))
    for statement in (
        "DROP TRIGGER suppression_state_insert_v2",
        "DROP TRIGGER suppression_state_update_v2",
        "DROP TRIGGER suppression_state_delete_v2",
        "DROP TABLE suppression_state",
        "UPDATE schema_version SET version = 3",
    ):
        behind_the_stores_back(path, statement)
    async with Store.connect(path) as store:
        assert _state(path) == (40, 0)
        assert await store.suppression.prepare()
        new = _hashes(1, "after")[0]
        _insert(path, new)
        assert list(await store.suppression.lookup([new, *_hashes(50, "absent")])) == [new]


async def test_key_filter_off_builds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    async with Store.connect(path, key_filter=False) as store:
        keys = _hashes(100)
        await _add(store, keys)
        assert set(await store.suppression.lookup([*keys, *_hashes(100, "x")])) == set(keys)
        assert not await store.suppression.prepare()
        assert store.suppression.reader is not None
        assert store.suppression.reader.key_filter is None


async def test_a_first_large_lookup_starts_the_build_and_close_stops_it(tmp_path: Path) -> None:
    path = tmp_path / "pm.db"
    store = await Store.open(path)
    try:
        keys = _hashes(200)
        await _add(store, keys)
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is None
        await store.suppression.lookup(keys[:10])  # a few keys: no build for them
        assert reader.key_filter is None
        assert set(await store.suppression.lookup(keys)) == set(keys)
        for _ in range(200):  # the build runs in a thread of its own
            if reader.key_filter is not None:
                break
            await asyncio.sleep(0.01)
        assert reader.key_filter is not None
        assert reader.key_filter.added == 200
    finally:
        await store.close()
    assert not [t for t in threading.enumerate() if "key-filter" in t.name]


def _saved(path: Path) -> tuple[str, int, int, int] | None:
    """The saved filter's ``(scheme, high, misordered, len(bits))``."""
    con = sqlite3.connect(path)
    try:
        row = con.execute(
            "SELECT scheme, high, misordered, length(bits) FROM suppression_filter"
        ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]), int(row[3]))
    finally:
        con.close()


async def test_the_next_process_loads_the_saved_filter_and_reads_only_whats_new(
    tmp_path: Path,
) -> None:
    path = tmp_path / "pm.db"
    store, keys = await _filled(path)
    reader = store.suppression.reader
    assert reader is not None
    assert reader.key_filter is not None
    assert reader.key_filter.origin == "built"
    await store.close()
    saved = _saved(path)
    assert saved is not None
    assert saved[1:3] == (3000, 0)
    new = _hashes(5, "after the save")
    for key in new:
        _insert(path, key)
    # Another process: the filter is loaded, brought up to the state, and finds all.
    async with Store.connect(path) as other:
        assert await other.suppression.prepare()
        loaded = other.suppression.reader.key_filter  # type: ignore[union-attr]
        assert loaded is not None
        assert loaded.origin == "loaded"
        assert loaded.high == 3005
        batch = [*_hashes(500, "absent"), *new, keys[0]]
        assert set(await other.suppression.lookup(batch)) == {*new, keys[0]}
    assert _saved(path) == saved  # 5 behind: not worth saving again


@pytest.mark.parametrize("damage", ["misordered", "scheme", "bits cut", "bits not a blob"])
async def test_a_saved_filter_that_cannot_be_used_is_built_again(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "pm.db"
    store, keys = await _filled(path)
    await store.close()
    if damage == "misordered":
        behind_the_stores_back(path, "DELETE FROM suppression WHERE id = 3000")
        moved = _hashes(1, "moved")[0]
        _insert(path, moved)  # the reused id: misordered moves on
        keys[-1] = moved  # the last key added had id 3000
    else:
        change = {
            "scheme": "scheme = 'bloom9-v0'",
            "bits cut": "bits = substr(bits, 1, 100)",
            "bits not a blob": "bits = 'text'",
        }[damage]
        behind_the_stores_back(path, f"UPDATE suppression_filter SET {change}")
    async with Store.connect(path) as other:
        assert await other.suppression.prepare()
        rebuilt = other.suppression.reader.key_filter  # type: ignore[union-attr]
        assert rebuilt is not None
        assert rebuilt.origin == "built"
        assert set(await other.suppression.lookup([*keys, *_hashes(100, "x")])) == set(keys)
    saved = _saved(path)
    assert saved is not None
    assert saved[0] == SCHEME
    assert saved[2] == (1 if damage == "misordered" else 0)


async def test_a_filter_that_cannot_be_saved_is_still_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pm.db"
    monkeypatch.setattr(fastread, "SAVE_WAIT", 0.05)
    async with Store.connect(path) as store:
        keys = _hashes(300)
        await _add(store, keys)
        holder = sqlite3.connect(path)
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            assert await store.suppression.prepare()
        finally:
            holder.rollback()
            holder.close()
        assert "saving the suppression key filter failed" in caplog.text
        assert set(await store.suppression.lookup([*keys, *_hashes(100, "x")])) == set(keys)
    assert _saved(path) is None


async def test_entries_added_while_a_stretch_is_read_again_push_no_old_one_out(
    tmp_path: Path,
) -> None:
    """A stretch holding an odd key is read a second time, row by row; entries another
    process lists between the two readings must not push old ones out of it (the next
    stretch starts after the last row read)."""
    path = tmp_path / "pm.db"
    async with Store.connect(path, key_filter=False) as store:
        await _add(store, _hashes(100, "old"))
    _insert(path, "00 odd key")  # sorts first: the first stretch is read row by row
    writer = sqlite3.connect(path)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        stored = [row[0] for row in writer.execute("SELECT key_hash FROM suppression")]
        low = sorted(_hashes(2000, "new"))[:20]  # prefixes inside the first stretch

        class Meanwhile:
            """``con`` as build_filter sees it; another process lists ``low`` between the
            stretch's two readings (a real insert, committed)."""

            def __init__(self) -> None:
                self.done = False

            def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
                if "group_concat" not in sql and "LIMIT ?" in sql and not self.done:
                    self.done = True
                    writer.executemany(
                        "INSERT INTO suppression (kind, key_hash, scope, scope_value, reason, "
                        "source, created_at) VALUES ('address', ?, 'global', '', 'import', "
                        "'feed', '2026-12-01T00:00:00+00:00')",
                        [(k,) for k in low],
                    )
                    writer.commit()
                return con.execute(sql, params)

        meanwhile = Meanwhile()
        built = build_filter(meanwhile, stretch=50)  # type: ignore[arg-type]
        assert meanwhile.done
        assert built is not None
        assert built.candidates(stored) == stored  # every entry there before the build
        assert built.high == 101  # the 20 new ones come by id at the first use
    finally:
        con.close()
        writer.close()


@pytest.mark.parametrize("then", ["nothing", "new objections"])
async def test_a_backup_restored_under_a_running_process_rebuilds_its_filter(
    tmp_path: Path, then: str
) -> None:
    """The file goes back in time (SQLite's backup API, the sqlite3 shell's .restore): an
    entry removed before the filter was built is back, and objections listed after the
    restore take ids the filter had seen: both found at the next lookup."""
    path, backup = tmp_path / "pm.db", tmp_path / "backup.db"
    store, keys = await _filled(path, 100)
    try:
        source = sqlite3.connect(path)
        target = sqlite3.connect(backup)
        source.backup(target)  # the nightly backup
        source.close()
        target.close()
        await _add(store, _hashes(50, "later"))
        assert await store.suppression.remove(keys[5], kind="address") == 1
        reader = store.suppression.reader
        assert reader is not None
        assert await store.suppression.prepare()  # the old filter is caught up and used
        absent = _hashes(100, "absent")
        assert keys[5] not in await store.suppression.lookup([*absent, keys[5]])
        assert reader.key_filter is not None
        assert reader.key_filter.high == 150
        source = sqlite3.connect(backup)
        target = sqlite3.connect(path)
        source.backup(target)  # restored into the live file
        source.close()
        target.close()
        fresh = _hashes(10, "objection") if then == "new objections" else []
        for key in fresh:
            _insert(path, key)  # ids 101-110: ones the filter had seen
        found = await store.suppression.lookup([*absent, *fresh, keys[5]])
        assert set(found) == {*fresh, keys[5]}
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["row deleted", "table dropped"])
async def test_a_state_created_again_never_meets_an_older_filter(tmp_path: Path, how: str) -> None:
    """Changes made while the state was missing went uncounted: the state created again at
    the next open has an epoch of its own, so the saved filter is not loaded."""
    path = tmp_path / "pm.db"
    store, _ = await _filled(path, 100)
    await store.close()
    if how == "row deleted":
        behind_the_stores_back(path, "DELETE FROM suppression_state")
    else:
        for trigger in ("insert", "update", "delete"):
            behind_the_stores_back(path, f"DROP TRIGGER suppression_state_{trigger}_v2")
        behind_the_stores_back(path, "DROP TABLE suppression_state")
    changed = _hashes(1, "changed")[0]
    behind_the_stores_back(path, f"UPDATE suppression SET key_hash = '{changed}' WHERE id = 7")
    async with Store.connect(path) as store:
        assert await store.suppression.prepare()
        reader = store.suppression.reader
        assert reader is not None
        assert reader.key_filter is not None
        assert reader.key_filter.origin == "built"
        assert list(await store.suppression.lookup([changed, *_hashes(100, "x")])) == [changed]


@pytest.mark.parametrize("alias", ["rowid", "oid", "_rowid_"])
async def test_an_id_changed_through_a_rowid_alias_is_counted(tmp_path: Path, alias: str) -> None:
    path = tmp_path / "pm.db"
    store, _ = await _filled(path, 100)
    try:
        moved = _hashes(1, "moved")[0]
        _insert(path, moved)  # id 101, counted
        behind_the_stores_back(path, f"UPDATE suppression SET {alias} = 0 WHERE id = 101")
        assert _state(path) == (101, 1)
        assert list(await store.suppression.lookup([moved, *_hashes(100, "x")])) == [moved]
    finally:
        await store.close()
