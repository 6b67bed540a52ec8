"""A lean Redis connection for the one command a proxy worker sends per call: the reserve script.

redis-py's asyncio client costs ~110 µs of CPU and several event-loop turns per command (measured:
load_tests/budget_cost.py and docs/performance.md#spend-limits), on the loop that forwards every
call. This sends ``EVALSHA`` on one pipelined connection and parses replies with **hiredis** (the
maintained C parser redis-py itself uses), answering each call from the read callback that brought
its reply, as the proxy's own llhttp upstream client does for HTTP. Everything else (settlements,
reads, the main process's store) stays on redis-py.

Replies come back in the order commands were sent (RESP), so a FIFO of callbacks matches them. A
command unanswered after ``timeout_s`` closes the connection and fails every pending command (the
calls go on as the store-error policy says); the next command reconnects, at most once a second.
A ``NOSCRIPT`` reply (Redis restarted and lost its script cache) is answered by sending the script
itself with ``EVAL`` for that command, and ``SCRIPT LOAD`` again.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import hiredis

#: Reconnect attempts are at least this far apart (a command between them fails at once).
RECONNECT_EVERY_S = 0.25
#: A reply, or the exception that stands for it (a connection failure, a Redis error).
Reply = Any
Answer = Callable[[Reply], None]


class RedisUnavailable(ConnectionError):
    pass


def command(*parts: str | int | bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: LeanRedis) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        owner = self.owner
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            owner.replied(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.lost(self, exc)


class LeanRedis:
    """One pipelined connection; :meth:`evalsha` calls ``answer`` with the reply or an exception."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = urlparse(url)
        self.timeout_s = timeout_s
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._failed_at = -1e9
        #: (sent at, answer, script body for a NOSCRIPT retry, keys, args), oldest first.
        self._pending: collections.deque[tuple[float, Answer, bytes | None, Sequence[Any]]] = (
            collections.deque()
        )
        self._scripts: dict[str, bytes] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._out: list[bytes] = []
        #: Commands that came while a connection was being made: sent on it, or failed with it.
        self._before_connect: list[tuple[float, Answer, bytes | None, Sequence[Any]]] = []

    def script(self, body: str) -> str:
        """Register a script; its SHA1 for :meth:`evalsha` (loaded on every (re)connect)."""
        sha = hashlib.sha1(body.encode()).hexdigest()
        self._scripts[sha] = body.encode()
        return sha

    def evalsha(self, sha: str, keys: Sequence[str], args: Sequence[str | int], answer: Answer) -> None:
        parts = ("EVALSHA", sha, len(keys), *keys, *args)
        conn = self._conn
        if conn is None or conn.transport is None:
            self._connect_soon()
            if self._connecting is None:  # between attempts: Redis is down
                answer(RedisUnavailable("Redis is not reachable"))
            else:  # sent once connected (or failed with the attempt, within timeout_s)
                self._before_connect.append((time.monotonic(), answer, self._scripts[sha], parts))
            return
        self._pending.append((time.monotonic(), answer, self._scripts[sha], parts))
        self._write(command(*parts))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._check_deadline)

    def _write(self, data: bytes) -> None:
        """Held until the loop has run the callbacks of its current batch, then sent in one write:
        a write wakes Redis, which would preempt this process in the middle of the batch (the same
        reason as llmtally.proxy.outbox)."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(b"".join(out))

    def replied(self, conn: _Protocol, reply: Reply) -> None:
        if conn is not self._conn or not self._pending:
            return
        sent, answer, body, parts = self._pending.popleft()
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT") and body is not None:
            # Redis lost its scripts (a restart): this one goes again as EVAL, in order after the rest.
            evaled = ("EVAL", body, *parts[2:])
            self._pending.append((sent, answer, None, evaled))
            self._pending.append((sent, _ignore, None, ()))
            self._write(command(*evaled) + command("SCRIPT", "LOAD", body))
            return
        answer(reply)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        oldest = self._pending[0][0]
        late = time.monotonic() - oldest
        if late >= self.timeout_s:
            conn, self._conn = self._conn, None  # no more commands on it: the next one reconnects
            self._failed_at = time.monotonic()
            self._out = []
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            self._fail_all(TimeoutError(f"Redis did not answer within {self.timeout_s} s"))
            return
        self._timer = asyncio.get_running_loop().call_later(self.timeout_s - late, self._check_deadline)

    def lost(self, conn: _Protocol, exc: Exception | None) -> None:
        if conn is self._conn:
            self._conn = None
            self._out = []
            self._failed_at = time.monotonic()
            self._fail_all(RedisUnavailable(f"the connection to Redis was lost: {exc}"))

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, collections.deque()
        for _, answer, _, _ in pending:
            answer(exc)

    def _connect_soon(self) -> None:
        if (
            self._closed
            or self._connecting is not None
            or time.monotonic() - self._failed_at < RECONNECT_EVERY_S
        ):
            return
        self._connecting = asyncio.ensure_future(self._connect())

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.transport is not None

    async def connect(self) -> None:
        """Connect now (raises when Redis cannot be reached)."""
        await self._connect(raise_errors=True)

    async def _connect(self, raise_errors: bool = False) -> None:
        loop = asyncio.get_running_loop()
        url = self.url
        try:
            if url.scheme == "unix":
                _, conn = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _Protocol(self), unquote(url.path)), self.timeout_s
                )
            else:
                context = ssl.create_default_context() if url.scheme == "rediss" else None
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: _Protocol(self), url.hostname or "127.0.0.1", url.port or 6379, ssl=context
                    ),
                    self.timeout_s,
                )
            await asyncio.wait_for(self._hello(conn), self.timeout_s)
            self._conn = conn
        except (OSError, TimeoutError, RedisUnavailable) as exc:
            self._failed_at = time.monotonic()
            waiting, self._before_connect = self._before_connect, []
            for _, answer, _, _ in waiting:
                answer(RedisUnavailable(f"cannot reach Redis: {exc}"))
            if raise_errors:
                raise RedisUnavailable(f"cannot reach Redis at {url.hostname or url.path}: {exc}") from exc
        else:
            waiting, self._before_connect = self._before_connect, []
            for item in waiting:
                self._pending.append(item)
                self._write(command(*item[3]))
            if waiting and self._timer is None:
                self._timer = loop.call_later(self.timeout_s, self._check_deadline)
        finally:
            self._connecting = None

    async def _hello(self, conn: _Protocol) -> None:
        """AUTH, SELECT and SCRIPT LOAD on a new connection, before any command uses it."""
        url = self.url
        parts: list[tuple[str | int | bytes, ...]] = []
        if url.password:
            parts.append(("AUTH", unquote(url.username or "default"), unquote(url.password)))
        db = url.path.strip("/") if url.scheme != "unix" else ""
        if db and db != "0":
            parts.append(("SELECT", db))
        parts += [("SCRIPT", "LOAD", body) for body in self._scripts.values()]
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[Reply]] = []
        assert conn.transport is not None
        self._conn = conn  # replies to these go through replied()
        for part in parts:
            future: asyncio.Future[Reply] = loop.create_future()
            replies.append(future)
            self._pending.append((time.monotonic(), _resolver(future), None, part))
            conn.transport.write(command(*part))
        try:
            for future in replies:
                reply = await future
                if isinstance(reply, Exception):
                    raise RedisUnavailable(str(reply))
        except BaseException:
            self._conn = None
            if conn.transport is not None:
                conn.transport.close()
            raise

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._fail_all(RedisUnavailable("closed"))
        waiting, self._before_connect = self._before_connect, []
        for _, answer, _, _ in waiting:
            answer(RedisUnavailable("closed"))


def _ignore(_: Reply) -> None:
    pass


def _resolver(future: asyncio.Future[Reply]) -> Answer:
    def resolve(reply: Reply) -> None:
        if not future.done():
            future.set_result(reply)

    return resolve
