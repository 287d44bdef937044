"""A real `mambastep serve` process of the byte-level test model, one thread, for the tests."""

from __future__ import annotations

from pathlib import Path

import httpx

from mambastep.serve.process import ServeProcess

from conftest import BYTE_MODEL

KEYS = ("key-one-0123456789", "key-two-0123456789")


def start_server(data_dir: Path, *args: str, store: str | None = None) -> ServeProcess:
    """The byte-level test model served from ``data_dir`` (or ``store``, a store URL), ``--threads 1``, ``args``."""
    return ServeProcess(BYTE_MODEL, data_dir, "--threads", "1", *args, store=store, timeout=120)


def client(server: ServeProcess, key: str | None = KEYS[0], timeout: float = 120) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)
