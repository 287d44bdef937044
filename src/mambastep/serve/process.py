"""`mambastep serve` as a child process on 127.0.0.1 and a free port: for scripts, benchmarks and
tests that need a real server and must stop it when they end."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A `mambastep serve` child process, ready (its ``/health`` answers 200) once constructed.

    Args:
        model: the checkpoint directory (or Hub id) to serve.
        data_dir: the SQLite store's folder (``--data-dir``), and where the log goes by default.
        args: further `mambastep serve` flags.
        store: a store URL (``--store``) in place of SQLite in ``data_dir``.
        log: where its output goes (default: ``serve-PORT.log`` beside ``data_dir``).
        timeout: seconds to wait for it to be ready.

    Raises:
        RuntimeError: it exited before it was ready (the end of its log in the message).
        TimeoutError: it was not ready in time (it is stopped).
    """

    def __init__(
        self,
        model: Path | str,
        data_dir: Path,
        *args: str,
        store: str | None = None,
        log: Path | None = None,
        timeout: float = 300,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or data_dir.parent / f"serve-{self.port}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mambastep.cli", "serve", "--model", str(model)]
        command += ["--port", str(self.port), *(["--store", store] if store else ["--data-dir", str(data_dir)]), *args]
        self._output = self.log.open("w")  # closed by stop()
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def _wait(self, timeout: float) -> None:
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
        raise TimeoutError(f"the server did not come up in {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a clean stop), wait for the exit (SIGKILL after 30 s); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._output.close()
        return self.process.returncode
