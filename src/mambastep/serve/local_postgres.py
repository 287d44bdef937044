"""A throwaway PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries, a
fresh cluster in a temporary directory, listening on 127.0.0.1 and a free port (trust auth), and a
unix socket in that directory. Run as the ``postgres`` user where the tests run as root (the
server refuses root)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mambastep.serve.process import free_port

MISSING = (
    "PostgreSQL's server binaries (initdb, pg_ctl) are missing: install Debian's postgresql package "
    "(apt-get install postgresql; .ci/run does)"
)


def server_bindir() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: ``pg_config --bindir``, Debian's
    /usr/lib/postgresql/VERSION/bin (the newest), or the PATH.

    Raises:
        RuntimeError: none has them.
    """
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).is_file() for tool in ("initdb", "pg_ctl")):
            return Path(candidate)
    raise RuntimeError(MISSING)


class PostgresServer:
    """A PostgreSQL server of its own, started once constructed; ``stop()`` and ``start()`` it
    at will (same data, same port), ``close()`` it to stop it and delete its files. With
    ``fsync`` off (tests) a commit does not wait for the disk; a benchmark of writes wants it on.

    Raises:
        RuntimeError: no binaries, or the server did not start (its log in the message).
    """

    USER = "postgres"

    def __init__(self, fsync: bool = False):
        self.fsync = fsync
        self.bindir = server_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="mambastep-postgres-"))  # a path the postgres user can reach
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql://{self.USER}@127.0.0.1:{self.port}"
        self._names = itertools.count()
        self._as = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as its own system user, in a folder it owns
            shutil.chown(self.root, self.USER)
            self._as = ["runuser", "-u", self.USER, "--"]
        try:
            self._run(
                "initdb", "-D", self.data, "-U", self.USER, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"
            )
            self.start()
        except BaseException:
            self.close()
            raise

    def _run(self, tool: str, *args) -> None:
        command = [*self._as, str(self.bindir / tool), *map(str, args)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr[-3000:]}{log}")

    def start(self) -> None:
        """Start the server (its data kept); returns once it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync={'on' if self.fsync else 'off'}"
        )
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "120", "start")

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: its connections are cut, its data kept)."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self) -> str:
        """A new, empty database on this server: its URL."""
        import psycopg

        name = f"test_{next(self._names)}"
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"{self.url}/{name}"

    def close(self) -> None:
        """Stop the server where it runs, and delete its files."""
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root)
