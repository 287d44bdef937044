"""``PostgresStore``: sessions in a PostgreSQL database (psycopg 3), for servers that share them.

Two tables, created where absent: ``mambastep_sessions`` (each session's metadata and its file
as ``bytea``) and ``mambastep_checkpoints`` (deleted with their session). Times come from the
database's clock, so every server that shares it orders sessions alike. A database that cannot
be reached raises ``StoreUnavailable``; the next call connects again.
"""

from __future__ import annotations

import threading

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mambastep.serve.store import (
    COLUMNS,
    Conflict,
    SessionStore,
    StoredSession,
    StoreUnavailable,
    new_session_id,
    session_from_row,
)

SCHEMA_LOCK = 0x6D616D6261  # the advisory lock held while the schema is created ("mamba")
_NOW = "extract(epoch FROM statement_timestamp())::double precision"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS mambastep_sessions (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        version BIGINT NOT NULL,
        position BIGINT NOT NULL,
        state_bytes BIGINT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        data BYTEA NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS mambastep_sessions_by_owner ON mambastep_sessions (owner, created, id)",
    """CREATE TABLE IF NOT EXISTS mambastep_checkpoints (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES mambastep_sessions (id) ON DELETE CASCADE,
        position BIGINT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        data BYTEA NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS mambastep_checkpoints_by_session ON mambastep_checkpoints (session_id)",
)


class PostgresStore(SessionStore):
    """Sessions in the PostgreSQL database ``url`` names (``postgresql://USER@HOST:PORT/DBNAME``,
    or any libpq connection string). A write is durable when it returns, as the database makes
    commits durable. One connection, behind a lock; several stores (servers) may share the
    database, and the session versions keep any two of them from both writing on top of the
    same version.

    Args:
        url: the database.
        connect_timeout: seconds to wait for a connection, where ``url`` does not say.

    Raises:
        ValueError: ``url`` is not a connection string.
        StoreUnavailable: the database cannot be reached.
    """

    def __init__(self, url: str, connect_timeout: int = 10):
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as err:
            raise ValueError(f"not a PostgreSQL URL: {_one_line(err)}") from None
        params.setdefault("connect_timeout", connect_timeout)
        params.setdefault("application_name", "mambastep")
        self._conninfo = make_conninfo(**params)
        host, port = params.get("host", "the local socket"), params.get("port", 5432)
        self.where = f"{host}:{port}/{params.get('dbname', params.get('user', ''))}"  # no password
        self._lock = threading.Lock()
        self._db: psycopg.Connection | None = None
        self._closed = False
        self._transaction(_create_schema)

    # ------------------------------------------------------------------ the connection

    def _unavailable(self, err: psycopg.Error) -> StoreUnavailable:
        return StoreUnavailable(f"cannot reach PostgreSQL at {self.where}: {_one_line(err)}")

    def _drop(self) -> None:
        """Close the connection (its transaction ends with it); the next call opens another."""
        db, self._db = self._db, None
        db.close()

    def _begin(self) -> psycopg.Connection:
        """The connection, in a new transaction. A connection found lost at BEGIN (the database
        restarted since its last use) is replaced once: nothing had been done on it."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if self._db is not None:
            try:
                self._db.execute("BEGIN")
                return self._db
            except psycopg.Error:
                if not (self._db.broken or self._db.closed):
                    raise
                self._drop()
        try:
            self._db = psycopg.connect(self._conninfo, autocommit=True)
            self._db.execute("BEGIN")
        except psycopg.OperationalError as err:
            if self._db is not None:
                self._drop()
            raise self._unavailable(err) from err
        return self._db

    def _transaction(self, work):
        """``work(cursor)`` in one transaction: committed if it returns, rolled back if it raises.

        Raises:
            StoreUnavailable: the connection failed (where it failed at COMMIT, the commit may
                have been applied).
        """
        with self._lock:
            db = self._begin()
            try:
                with db.cursor(binary=True) as cursor:
                    result = work(cursor)
                db.execute("COMMIT")
            except BaseException as err:
                lost = db.broken or db.closed
                if lost:
                    self._drop()
                else:
                    self._rollback()
                if lost and isinstance(err, psycopg.Error):
                    raise self._unavailable(err) from err
                raise
            return result

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except psycopg.Error:
            self._drop()  # the transaction ends with the connection; the caller raises its own error

    # ------------------------------------------------------------------ the interface

    def create(self, owner: str, data: bytes, position: int, state_bytes: int) -> StoredSession:
        row = self._transaction(
            lambda cur: cur.execute(
                f"INSERT INTO mambastep_sessions VALUES (%s, %s, 1, %s, %s, {_NOW}, {_NOW}, %s) RETURNING {COLUMNS}",
                (new_session_id(), owner, position, state_bytes, data),
            ).fetchone()
        )
        return session_from_row(row, data)

    def get(self, session_id: str, owner: str, with_data: bool = True) -> StoredSession | None:
        columns = COLUMNS + (", data" if with_data else "")
        row = self._transaction(
            lambda cur: cur.execute(
                f"SELECT {columns} FROM mambastep_sessions WHERE id = %s AND owner = %s", (session_id, owner)
            ).fetchone()
        )
        if row is None:
            return None
        return session_from_row(row[:8], row[8] if with_data else None)

    def update(self, session_id: str, owner: str, data: bytes, position: int, version: int) -> StoredSession:
        def work(cur):
            row = cur.execute(
                f"UPDATE mambastep_sessions SET version = version + 1, position = %s, updated = {_NOW}, data = %s "
                f"WHERE id = %s AND owner = %s AND version = %s RETURNING {COLUMNS}",
                (position, data, session_id, owner, version),
            ).fetchone()
            if row is not None:
                return row
            found = cur.execute(
                "SELECT version FROM mambastep_sessions WHERE id = %s AND owner = %s", (session_id, owner)
            ).fetchone()
            if found is None:
                raise KeyError(session_id)
            raise Conflict(session_id, found[0], version)

        return session_from_row(self._transaction(work))

    def delete(self, session_id: str, owner: str) -> bool:
        deleted = self._transaction(
            lambda cur: (
                cur.execute("DELETE FROM mambastep_sessions WHERE id = %s AND owner = %s", (session_id, owner)).rowcount
            )
        )
        return deleted > 0

    def list(self, owner: str, offset: int = 0, limit: int = 100) -> list[StoredSession]:
        rows = self._transaction(
            lambda cur: cur.execute(
                f"SELECT {COLUMNS} FROM mambastep_sessions WHERE owner = %s ORDER BY created, id LIMIT %s OFFSET %s",
                (owner, limit, offset),
            ).fetchall()
        )
        return [session_from_row(row) for row in rows]

    def count(self, owner: str | None = None) -> int:
        if owner is None:
            return self._transaction(lambda cur: cur.execute("SELECT count(*) FROM mambastep_sessions").fetchone()[0])
        return self._transaction(
            lambda cur: cur.execute("SELECT count(*) FROM mambastep_sessions WHERE owner = %s", (owner,)).fetchone()[0]
        )

    def add_checkpoint(self, session_id: str, owner: str, data: bytes, position: int) -> int:
        def work(cur):
            try:
                row = cur.execute(
                    "INSERT INTO mambastep_checkpoints (session_id, position, created, data) "
                    f"SELECT id, %s, {_NOW}, %s FROM mambastep_sessions WHERE id = %s AND owner = %s RETURNING id",
                    (position, data, session_id, owner),
                ).fetchone()
            except psycopg.errors.ForeignKeyViolation:  # deleted since the SELECT read it
                raise KeyError(session_id) from None
            if row is None:
                raise KeyError(session_id)
            return row[0]

        return self._transaction(work)

    def get_checkpoint(self, session_id: str, owner: str, checkpoint_id: int) -> bytes | None:
        row = self._transaction(
            lambda cur: cur.execute(
                "SELECT c.data FROM mambastep_checkpoints c JOIN mambastep_sessions s ON s.id = c.session_id "
                "WHERE c.id = %s AND c.session_id = %s AND s.owner = %s",
                (checkpoint_id, session_id, owner),
            ).fetchone()
        )
        return None if row is None else row[0]

    def check(self) -> None:
        self._transaction(lambda cur: cur.execute("SELECT 1"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._drop()


def _create_schema(cur) -> None:
    """The tables and indexes, where absent; under an advisory lock, so that servers starting
    at once do not race to create the same table."""
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    for statement in _SCHEMA:
        cur.execute(statement)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
