"""A real `mambastep serve` process of the bundled model, one thread, for the tests."""

from __future__ import annotations

from pathlib import Path

import httpx

from mambastep.cli.common import DEFAULT_MODEL
from mambastep.serve.process import ServeProcess

KEYS = ("key-one-0123456789", "key-two-0123456789")


def start_server(data_dir: Path, *args: str, store: str | None = None) -> ServeProcess:
    """The bundled model served from ``data_dir`` (or ``store``, a store URL) with ``--threads 1`` and ``args``."""
    return ServeProcess(DEFAULT_MODEL, data_dir, "--threads", "1", *args, store=store, timeout=120)


def client(server: ServeProcess, key: str | None = KEYS[0], timeout: float = 120) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)
