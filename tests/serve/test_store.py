"""The session stores, SQLite and PostgreSQL alike, through their one interface: sessions,
versions, owners, checkpoints, paging, and two replicas writing one session at once."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from mambastep.serve.sqlite_store import SQLiteStore
from mambastep.serve.store import Conflict, StoredSession, open_store, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A new, empty store's URL, of each kind."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "data")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url):
    opened = open_store(store_url)
    yield opened
    opened.close()


def checkpoint_rows(url: str) -> int:
    """The checkpoints kept in the store at ``url``, counted in its own tables."""
    if url.startswith("sqlite:"):
        with closing(sqlite3.connect(Path(url[len("sqlite:///") :]) / SQLiteStore.FILE)) as db:
            return db.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
    import psycopg

    with psycopg.connect(url) as db:
        return db.execute("SELECT count(*) FROM mambastep_checkpoints").fetchone()[0]


def test_create_get_and_update(store):
    created = store.create("owner", b"v1", position=1, state_bytes=10)
    assert created.id.startswith("sess_") and created.version == 1 and created.data == b"v1"
    assert (created.position, created.state_bytes, created.file_bytes) == (1, 10, 2)
    assert store.get(created.id, "owner") == created
    assert store.get(created.id, "owner", with_data=False) == StoredSession(**{**vars(created), "data": None})

    updated = store.update(created.id, "owner", b"v2-longer", 7, version=1)
    assert (updated.version, updated.position, updated.file_bytes, updated.state_bytes) == (2, 7, 9, 10)
    assert updated.created == created.created and updated.updated >= created.updated
    assert store.get(created.id, "owner").data == b"v2-longer"


def test_a_stale_version_is_a_conflict_and_a_missing_session_a_key_error(store):
    created = store.create("owner", b"v1", position=1, state_bytes=10)
    store.update(created.id, "owner", b"v2", 2, version=1)
    with pytest.raises(Conflict, match="is at version 2, not 1") as conflict:
        store.update(created.id, "owner", b"v2-other", 2, version=1)
    assert (conflict.value.session_id, conflict.value.stored, conflict.value.given) == (created.id, 2, 1)
    stored = store.get(created.id, "owner")
    assert (stored.version, stored.data) == (2, b"v2")
    with pytest.raises(KeyError):
        store.update("sess_missing", "owner", b"x", 3, version=2)
    with pytest.raises(KeyError):
        store.update(created.id, "someone else", b"x", 3, version=2)


def test_owners_see_only_their_own_sessions(store):
    mine = store.create("me", b"mine", 1, 10)
    checkpoint = store.add_checkpoint(mine.id, "me", b"mark", 1)
    assert store.get(mine.id, "you") is None
    assert store.list("you") == [] and store.count("you") == 0
    assert store.get_checkpoint(mine.id, "you", checkpoint) is None
    with pytest.raises(KeyError):
        store.add_checkpoint(mine.id, "you", b"x", 1)
    assert not store.delete(mine.id, "you")
    assert store.get(mine.id, "me").data == b"mine"


def test_checkpoints(store):
    first, other = store.create("owner", b"s", 1, 10), store.create("owner", b"t", 1, 10)
    a = store.add_checkpoint(first.id, "owner", b"at 1", 1)
    store.update(first.id, "owner", b"s2", 2, version=1)
    b = store.add_checkpoint(first.id, "owner", b"at 2", 2)
    assert a != b
    assert store.get_checkpoint(first.id, "owner", a) == b"at 1"
    assert store.get_checkpoint(first.id, "owner", b) == b"at 2"
    assert store.get_checkpoint(other.id, "owner", a) is None  # another session's
    assert store.get_checkpoint(first.id, "owner", max(a, b) + 1) is None
    with pytest.raises(KeyError):
        store.add_checkpoint("sess_missing", "owner", b"x", 1)
    assert store.get(first.id, "owner").version == 2  # a checkpoint leaves the session as it is


def test_deleting_a_session_deletes_its_checkpoints(store, store_url):
    kept, deleted = store.create("owner", b"k", 1, 10), store.create("owner", b"d", 1, 10)
    store.add_checkpoint(kept.id, "owner", b"k1", 1)
    gone = [store.add_checkpoint(deleted.id, "owner", f"d{i}".encode(), 1) for i in range(2)]
    assert checkpoint_rows(store_url) == 3
    assert store.delete(deleted.id, "owner")
    assert store.get(deleted.id, "owner") is None and not store.delete(deleted.id, "owner")
    assert all(store.get_checkpoint(deleted.id, "owner", c) is None for c in gone)
    assert checkpoint_rows(store_url) == 1 and store.get(kept.id, "owner").data == b"k"


def test_lists_oldest_first_in_pages_and_counts(store):
    ids = []
    for i in range(5):
        ids.append(store.create("a", f"a{i}".encode(), i + 1, 10).id)
        store.create("b", b"b", 1, 10)
    listed = store.list("a")
    assert [s.id for s in listed] == ids and all(s.data is None for s in listed)
    assert [s.position for s in listed] == [1, 2, 3, 4, 5] and {s.file_bytes for s in listed} == {2}
    assert [s.id for s in store.list("a", offset=1, limit=2)] == ids[1:3]
    assert [s.id for s in store.list("a", offset=4, limit=10)] == ids[4:]
    assert store.list("a", offset=5) == []
    assert (store.count("a"), store.count("b"), store.count()) == (5, 5, 10)


def test_a_large_file_round_trips(store):
    data = os.urandom(3 << 20)
    created = store.create("owner", data, 1, 10)
    assert created.file_bytes == len(data) and store.get(created.id, "owner").data == data
    checkpoint = store.add_checkpoint(created.id, "owner", data[::-1], 1)
    assert store.get_checkpoint(created.id, "owner", checkpoint) == data[::-1]


def test_a_reopened_store_has_every_session(store_url):
    first = open_store(store_url)
    created = first.create("owner", b"v1", 1, 10)
    first.update(created.id, "owner", b"v2", 2, version=1)
    first.close()
    again = open_store(store_url)  # the schema exists already
    try:
        stored = again.get(created.id, "owner")
        assert (stored.version, stored.data) == (2, b"v2") and again.count() == 1
        again.check()
    finally:
        again.close()


def test_two_replicas_writing_one_version_cannot_both_win(store_url):
    """Two stores on one database (two servers), each writing on top of the same version at
    the same moment, round after round: one wins, the other gets Conflict, nothing is lost."""
    replicas = [open_store(store_url), open_store(store_url)]
    try:
        session = replicas[0].create("owner", b"start", 0, 10)
        version, start = 1, threading.Barrier(2)
        for turn in range(20):
            results: list = [None, None]

            def write(i: int) -> None:
                start.wait()
                try:
                    results[i] = replicas[i].update(session.id, "owner", f"{turn}:{i}".encode(), turn + 1, version)
                except Conflict as err:
                    results[i] = err

            threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            won = [i for i in range(2) if isinstance(results[i], StoredSession)]
            assert len(won) == 1 and isinstance(results[1 - won[0]], Conflict), results
            version += 1
            stored = replicas[1 - won[0]].get(session.id, "owner")
            assert (stored.version, stored.data) == (version, f"{turn}:{won[0]}".encode())
    finally:
        for replica in replicas:
            replica.close()


def test_the_sqlite_file_stays_sound(tmp_path):
    store = SQLiteStore(tmp_path)
    created = store.create("owner", b"v1", 1, 10)
    store.update(created.id, "owner", b"v2", 2, version=1)
    store.add_checkpoint(created.id, "owner", b"mark", 2)
    store.delete(created.id, "owner")
    assert store.integrity() == "ok"
    store.close()
