"""How the server runs: where it listens, who may call it, what it keeps, and its limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from mambastep.serve.store import sqlite_url, store_kind


class ServeError(ValueError):
    """Server settings that cannot work as given."""


@dataclass(frozen=True)
class Limits:
    """What one caller may ask of the server; beyond, a clear 4xx.

    body_bytes: request body (JSON); import_bytes: an imported session file.
    max_tokens: tokens one completion or generation may ask for; prompt_tokens: tokens of
        input one request may carry (longer input goes through ``feed`` in pieces).
    sessions_per_key: stored sessions per API key; n: completions per prompt.
    queue: requests at the model at once (waiting or running); beyond, 429 with Retry-After.
    """

    body_bytes: int = 1 << 20
    import_bytes: int = 256 << 20
    max_tokens: int = 4096
    prompt_tokens: int = 65536
    sessions_per_key: int = 10000
    n: int = 16
    queue: int = 256

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServeError(f"limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServeSettings:
    """The server's settings.

    host, port: where it listens. api_keys: the keys a caller may present (``Authorization:
    Bearer KEY``); none means no key is asked for, which only a loopback address allows.
    data_dir: the SQLite store's directory (``sessions.sqlite3``), where ``store`` is None.
    store: the store's URL, ``sqlite:///DIR`` or ``postgresql://USER@HOST:PORT/DBNAME``
    (``store_url``: this, or SQLite in ``data_dir``). max_batch: sequences decoded in one step.
    sessions_in_memory: sessions kept hot (least recently used leave first; the others live in
    the store only). prefill_piece: prompt tokens read between two decode steps (one request's
    piece, or several requests' short prompts), so a long prompt delays the others by about one
    piece. model_name: what ``/v1/models`` calls the model.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    data_dir: Path = Path("mambastep-data")
    store: str | None = None
    max_batch: int = 16
    sessions_in_memory: int = 64
    prefill_piece: int = 512
    model_name: str = "mambastep"
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        for name in ("max_batch", "sessions_in_memory", "prefill_piece"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ServeError(f"{name} must be a positive integer, got {value!r}")
        try:
            store_kind(self.store_url)
        except ValueError as err:
            raise ServeError(str(err)) from None
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeError(f"port must lie in [0, 65535], got {self.port!r}")
        if any(not isinstance(k, str) or len(k) < 8 or k != k.strip() for k in self.api_keys):
            raise ServeError("an API key must be a string of at least 8 characters without surrounding spaces")
        if not self.api_keys and not is_loopback(self.host):
            raise ServeError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach it could read "
                "and change every session. Add one with --api-key KEY (or --api-keys-file FILE, one key a line), "
                "or listen on 127.0.0.1"
            )

    @property
    def store_url(self) -> str:
        """Where sessions are kept: ``store``, or SQLite in ``data_dir``."""
        return self.store if self.store is not None else sqlite_url(self.data_dir)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_keys_file(path: Path) -> tuple[str, ...]:
    """API keys from a file, one a line; blank lines and lines starting with # are skipped.

    Raises:
        FileNotFoundError: no file at ``path``.
        ServeError: a file with no key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no API keys file at {path}")
    keys = tuple(line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    if not keys:
        raise ServeError(f"{path} holds no API key")
    return keys
