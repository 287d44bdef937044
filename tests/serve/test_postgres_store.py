"""What only the PostgreSQL store does: a database that goes away and comes back, a connection
lost in the middle of a write, servers creating the schema at once; and the store URLs."""

from __future__ import annotations

import sys
import threading
import time

import psycopg
import pytest

from mambastep.cli import main
from mambastep.serve.postgres_store import PostgresStore
from mambastep.serve.process import free_port
from mambastep.serve.settings import ServeError, ServeSettings
from mambastep.serve.store import Conflict, StoreUnavailable, open_store, store_kind


def test_a_database_down_is_store_unavailable_until_it_is_back(own_postgres):
    store = open_store(own_postgres.create_database())
    created = store.create("owner", b"v1", 1, 10)
    checkpoint = store.add_checkpoint(created.id, "owner", b"mark", 1)
    store.update(created.id, "owner", b"v2", 2, version=1)

    own_postgres.stop()
    for call in (
        lambda: store.get(created.id, "owner"),
        lambda: store.update(created.id, "owner", b"lost", 3, version=2),
        lambda: store.create("owner", b"lost", 1, 10),
        store.check,
    ):
        with pytest.raises(StoreUnavailable, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:\d+/test_\d+: .*refused"):
            call()
    own_postgres.start()
    stored = store.get(created.id, "owner")  # the same store object, connected again
    assert (stored.version, stored.data) == (2, b"v2") and store.count() == 1
    assert store.get_checkpoint(created.id, "owner", checkpoint) == b"mark"

    own_postgres.stop()  # a restart between two calls: the first call after it works
    own_postgres.start()
    assert store.update(created.id, "owner", b"v3", 3, version=2).version == 3
    store.close()


def test_a_connection_lost_in_the_middle_of_a_write_changes_nothing(postgres_url):
    store = open_store(postgres_url)
    created = store.create("owner", b"v1", 1, 10)
    with psycopg.connect(postgres_url) as other:  # holds the session's row, so the write waits on it
        other.execute("SELECT 1 FROM mambastep_sessions WHERE id = %s FOR UPDATE", (created.id,))
        failed: list[BaseException] = []

        def write():
            try:
                store.update(created.id, "owner", b"v2", 2, version=1)
            except BaseException as err:
                failed.append(err)

        writer = threading.Thread(target=write)
        writer.start()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            waiting = None
            while waiting is None and writer.is_alive():  # until the write waits on the row
                time.sleep(0.01)
                waiting = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'mambastep' AND wait_event_type = 'Lock'"
                ).fetchone()
            assert waiting is not None, failed
            admin.execute("SELECT pg_terminate_backend(%s)", waiting)
        writer.join()
        other.rollback()
    assert len(failed) == 1 and isinstance(failed[0], StoreUnavailable), failed
    stored = store.get(created.id, "owner")
    assert (stored.version, stored.data) == (1, b"v1")
    assert store.update(created.id, "owner", b"v2", 2, version=1).version == 2
    store.close()


def test_servers_starting_at_once_create_the_schema_once(postgres_url):
    for _ in range(5):
        start, stores, failures = threading.Barrier(4), [], []

        def open_one():
            start.wait()
            try:
                stores.append(PostgresStore(postgres_url))
            except BaseException as err:
                failures.append(err)

        threads = [threading.Thread(target=open_one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [] and len(stores) == 4
        created = stores[0].create("owner", b"x", 1, 10)
        assert all(store.get(created.id, "owner").data == b"x" for store in stores)
        with pytest.raises(Conflict):
            stores[1].update(created.id, "owner", b"y", 2, version=2)
        for store in stores:
            store.close()
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute("DROP TABLE mambastep_checkpoints, mambastep_sessions")


def test_an_unreachable_database_is_store_unavailable_at_once():
    with pytest.raises(StoreUnavailable, match="cannot reach PostgreSQL at 127.0.0.1"):
        open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/mambastep")


def test_store_urls():
    assert store_kind("sqlite:///data") == "sqlite" and store_kind("sqlite:////var/lib/x") == "sqlite"
    assert store_kind("postgresql://u@h:5432/db") == store_kind("postgres://h/db") == "postgresql"
    for url in ("mysql://h/db", "data", "sqlite://host/data", "sqlite:///", "postgresql:/h"):
        with pytest.raises(ValueError):
            store_kind(url)
    with pytest.raises(ServeError, match="unknown store 'redis://h'"):
        ServeSettings(store="redis://h")
    assert ServeSettings(data_dir="d").store_url == "sqlite:///d"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        open_store("postgresql://h/db?no_such_option=1")


def test_a_postgresql_store_without_psycopg_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where it is not installed
    monkeypatch.delitem(sys.modules, "mambastep.serve.postgres_store")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'mambastep\[cluster\]'"):
        open_store("postgresql://h/db")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--store", "mysql://h/db"], "unknown store 'mysql://h/db'"),
        (["--store", "postgresql://postgres@127.0.0.1:{port}/x"], "cannot reach PostgreSQL at 127.0.0.1:"),
    ],
)
def test_serve_refuses_a_store_it_cannot_use_in_one_line(capsys, args, message):
    args = [a.format(port=free_port()) for a in args]
    assert main(["serve", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mambastep: error: {message}") and err.count("\n") == 1


def test_serve_takes_a_data_dir_or_a_store_not_both(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--data-dir", "d", "--store", "sqlite:///d"])
    assert exit.value.code == 2 and "--store: not allowed with argument --data-dir" in capsys.readouterr().err
