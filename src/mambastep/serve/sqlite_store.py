"""``SQLiteStore``: the embedded default store, one SQLite file (the standard library's
``sqlite3``, write-ahead log, every commit fsynced)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from mambastep.serve.store import COLUMNS, Conflict, SessionStore, StoredSession, new_session_id, session_from_row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    version INTEGER NOT NULL,
    position INTEGER NOT NULL,
    state_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, created);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_session ON checkpoints (session_id);
"""


class SQLiteStore(SessionStore):
    """Sessions in one SQLite file (``directory/sessions.sqlite3``), in write-ahead-log mode
    with every commit fsynced: a write that returned survives a crash of the process or of
    the machine, and one that did not leaves nothing behind. One connection, behind a lock."""

    FILE = "sessions.sqlite3"

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def _transaction(self, work):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def create(self, owner: str, data: bytes, position: int, state_bytes: int) -> StoredSession:
        session_id, now = new_session_id(), time.time()
        self._transaction(
            lambda db: db.execute(
                "INSERT INTO sessions VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                (session_id, owner, position, state_bytes, now, now, data),
            )
        )
        return StoredSession(session_id, owner, 1, position, state_bytes, len(data), now, now, data)

    def get(self, session_id: str, owner: str, with_data: bool = True) -> StoredSession | None:
        columns = COLUMNS + (", data" if with_data else "")
        with self._lock:
            row = self._db.execute(
                f"SELECT {columns} FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
        if row is None:
            return None
        return session_from_row(row[:8], row[8] if with_data else None)

    def update(self, session_id: str, owner: str, data: bytes, position: int, version: int) -> StoredSession:
        def work(db):
            found = db.execute(
                "SELECT version FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
            if found is None:
                raise KeyError(session_id)
            if found[0] != version:
                raise Conflict(session_id, found[0], version)
            db.execute(
                "UPDATE sessions SET version = version + 1, position = ?, updated = ?, data = ? WHERE id = ?",
                (position, time.time(), data, session_id),
            )
            return db.execute(f"SELECT {COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()

        return session_from_row(self._transaction(work))

    def delete(self, session_id: str, owner: str) -> bool:
        cursor = self._transaction(
            lambda db: db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
        )
        return cursor.rowcount > 0

    def list(self, owner: str, offset: int = 0, limit: int = 100) -> list[StoredSession]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM sessions WHERE owner = ? ORDER BY created, id LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
        return [session_from_row(row) for row in rows]

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            if owner is None:
                return self._db.execute("SELECT count(*) FROM sessions").fetchone()[0]
            return self._db.execute("SELECT count(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()[0]

    def add_checkpoint(self, session_id: str, owner: str, data: bytes, position: int) -> int:
        def work(db):
            if db.execute("SELECT 1 FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)).fetchone() is None:
                raise KeyError(session_id)
            return db.execute(
                "INSERT INTO checkpoints (session_id, position, created, data) VALUES (?, ?, ?, ?)",
                (session_id, position, time.time(), data),
            ).lastrowid

        return self._transaction(work)

    def get_checkpoint(self, session_id: str, owner: str, checkpoint_id: int) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT c.data FROM checkpoints c JOIN sessions s ON s.id = c.session_id "
                "WHERE c.id = ? AND c.session_id = ? AND s.owner = ?",
                (checkpoint_id, session_id, owner),
            ).fetchone()
        return None if row is None else row[0]

    def check(self) -> None:
        with self._lock:
            self._db.execute("SELECT 1")

    def integrity(self) -> str:
        """SQLite's own integrity check: "ok" for a sound file."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
