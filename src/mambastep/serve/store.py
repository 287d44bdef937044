"""Where the server keeps sessions: their metadata and their files (the bytes ``Session.save``
writes), and the files of their checkpoints.

``SessionStore`` is the interface, ``open_store(url)`` opens one from its URL:
``sqlite:///DIR`` (DIR as given: ``sqlite:///data`` is relative, ``sqlite:////var/lib/x``
absolute; ``SQLiteStore``, the embedded default, in ``sqlite_store``) or
``postgresql://USER@HOST:PORT/DBNAME`` (``PostgresStore``, in ``postgres_store``, for servers
that share their sessions; it needs the ``cluster`` extra). Every method is one transaction,
and a write is durable when it returns. Each session carries a version that every write
raises by one; a write names the version it read, so two writers can never both apply a
change on top of the same old state: the second gets ``Conflict``. A store whose database
cannot be reached raises ``StoreUnavailable``, and works again once it can.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass


class Conflict(RuntimeError):
    """A write on top of a version of the session that is no longer the latest."""

    def __init__(self, session_id: str, stored: int, given: int):
        super().__init__(f"session {session_id} is at version {stored}, not {given}")
        self.session_id, self.stored, self.given = session_id, stored, given


class StoreUnavailable(RuntimeError):
    """The store's database cannot be reached now (down, refusing connections, the connection
    lost). Nothing was changed, except that a write whose connection was lost while it
    committed may have been applied; the next call tries again."""


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
    def check(self) -> None:
        """Reach the database (a trivial query).

        Raises:
            StoreUnavailable: it cannot be reached now.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources."""


def new_session_id() -> str:
    return f"sess_{secrets.token_hex(12)}"


# A session's metadata, in the order ``session_from_row`` reads it (the same SQL in every store).
COLUMNS = "id, owner, version, position, state_bytes, length(data), created, updated"


def session_from_row(row, data: bytes | None = None) -> StoredSession:
    """A ``StoredSession`` from a row of ``COLUMNS`` (and its file, where read)."""
    session_id, owner, version, position, state_bytes, file_bytes, created, updated = row
    return StoredSession(session_id, owner, version, position, state_bytes, file_bytes, created, updated, data)


SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}


def store_kind(url: str) -> str:
    """Which store a URL names: "sqlite" or "postgresql".

    Raises:
        ValueError: a URL of another scheme, or ``sqlite:`` without a directory.
    """
    scheme, separator, rest = url.partition("://")
    kind = SCHEMES.get(scheme) if separator else None
    if kind is None:
        raise ValueError(f"unknown store {url!r}: give sqlite:///DIR or postgresql://USER@HOST:PORT/DBNAME")
    if kind == "sqlite" and (not rest.startswith("/") or rest == "/"):
        raise ValueError(f"a SQLite store is sqlite:///DIR (three slashes, then the directory), not {url!r}")
    return kind


def sqlite_url(directory) -> str:
    """The store URL of SQLite in ``directory`` (relative or absolute, as given)."""
    return f"sqlite:///{directory}"


def open_store(url: str) -> SessionStore:
    """The store ``url`` names, opened (its schema created where absent).

    Raises:
        ValueError: a URL that names no store (see ``store_kind``).
        ModuleNotFoundError: a PostgreSQL store without psycopg installed.
        StoreUnavailable: its database cannot be reached.
    """
    if store_kind(url) == "sqlite":
        from mambastep.serve.sqlite_store import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :])
    try:
        from mambastep.serve.postgres_store import PostgresStore
    except ModuleNotFoundError as err:
        if err.name != "psycopg":
            raise
        raise ModuleNotFoundError(
            "a PostgreSQL store needs psycopg: pip install 'mambastep[cluster]'", name="psycopg"
        ) from err
    return PostgresStore(url)
