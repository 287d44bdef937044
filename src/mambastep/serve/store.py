"""Where the server keeps sessions: their metadata and their files (the bytes ``Session.save``
writes), and the files of their checkpoints.

``SessionStore`` is the interface; ``SQLiteStore`` the embedded default (the standard
library's ``sqlite3``, write-ahead log, every commit fsynced). Every method is one transaction,
and a write is durable when it returns. Each session carries a version that every write
raises by one; a write names the version it read, so two writers can never both apply a
change on top of the same old state: the second gets ``Conflict``.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


class Conflict(RuntimeError):
    """A write on top of a version of the session that is no longer the latest."""


@dataclass(frozen=True)
class StoredSession:
    """A session's metadata as the store keeps it (``data``: its file, where asked for)."""

    id: str
    owner: str
    version: int
    position: int
    state_bytes: int
    file_bytes: int
    created: float
    updated: float
    data: bytes | None = None


class SessionStore(ABC):
    """The sessions of every owner (an API key's digest), each a session file and its metadata."""

    @abstractmethod
    def create(self, owner: str, data: bytes, position: int, state_bytes: int) -> StoredSession:
        """Store a new session; returns it (version 1) with a fresh id."""

    @abstractmethod
    def get(self, session_id: str, owner: str, with_data: bool = True) -> StoredSession | None:
        """The session ``session_id`` of ``owner``; None where there is none (or another owner's)."""

    @abstractmethod
    def update(self, session_id: str, owner: str, data: bytes, position: int, version: int) -> StoredSession:
        """Replace the session's file, which was read at ``version``.

        Raises:
            Conflict: the stored version is no longer ``version``.
            KeyError: no such session of ``owner``.
        """

    @abstractmethod
    def delete(self, session_id: str, owner: str) -> bool:
        """Delete the session and its checkpoints; False where there was none."""

    @abstractmethod
    def list(self, owner: str, offset: int = 0, limit: int = 100) -> list[StoredSession]:
        """``owner``'s sessions, oldest first, without their files."""

    @abstractmethod
    def count(self, owner: str | None = None) -> int:
        """Sessions stored for ``owner``, or for everyone."""

    @abstractmethod
    def add_checkpoint(self, session_id: str, owner: str, data: bytes, position: int) -> int:
        """Keep a copy of the session's file as a checkpoint; returns its id.

        Raises:
            KeyError: no such session of ``owner``.
        """

    @abstractmethod
    def get_checkpoint(self, session_id: str, owner: str, checkpoint_id: int) -> bytes | None:
        """The file kept as checkpoint ``checkpoint_id`` of the session; None where there is none."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources."""


def new_session_id() -> str:
    return f"sess_{secrets.token_hex(12)}"


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
_COLUMNS = "id, owner, version, position, state_bytes, length(data), created, updated"


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

    @staticmethod
    def _row(row, data: bytes | None = None) -> StoredSession:
        session_id, owner, version, position, state_bytes, file_bytes, created, updated = row
        return StoredSession(session_id, owner, version, position, state_bytes, file_bytes, created, updated, data)

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
        columns = _COLUMNS + (", data" if with_data else "")
        with self._lock:
            row = self._db.execute(
                f"SELECT {columns} FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
        if row is None:
            return None
        return self._row(row[:8], row[8] if with_data else None)

    def update(self, session_id: str, owner: str, data: bytes, position: int, version: int) -> StoredSession:
        def work(db):
            found = db.execute(
                "SELECT version FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
            if found is None:
                raise KeyError(session_id)
            if found[0] != version:
                raise Conflict(f"session {session_id} is at version {found[0]}, not {version}")
            db.execute(
                "UPDATE sessions SET version = version + 1, position = ?, updated = ?, data = ? WHERE id = ?",
                (position, time.time(), data, session_id),
            )
            return db.execute(f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()

        return self._row(self._transaction(work))

    def delete(self, session_id: str, owner: str) -> bool:
        cursor = self._transaction(
            lambda db: db.execute("DELETE FROM sessions WHERE id = ? AND owner = ?", (session_id, owner))
        )
        return cursor.rowcount > 0

    def list(self, owner: str, offset: int = 0, limit: int = 100) -> list[StoredSession]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE owner = ? ORDER BY created, id LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
        return [self._row(row) for row in rows]

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

    def integrity(self) -> str:
        """SQLite's own integrity check: "ok" for a sound file."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
