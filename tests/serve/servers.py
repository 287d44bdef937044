"""A real `mambastep serve` process on 127.0.0.1 and a free port, started and stopped by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mambastep.cli.common import DEFAULT_MODEL

KEYS = ("key-one-0123456789", "key-two-0123456789")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `mambastep serve` subprocess; ``url`` once it answers /health with 200."""

    def __init__(self, data_dir: Path, *args: str, model: Path = DEFAULT_MODEL):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "mambastep.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
            "--threads",
            "1",
            *args,
        ]
        self.log = data_dir.parent / f"server-{self.port}.log"
        self._output = self.log.open("w")  # closed by stop()
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.wait()

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not come up: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        return self.process.returncode


def client(server: Server, key: str | None = KEYS[0], timeout: float = 120) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)
