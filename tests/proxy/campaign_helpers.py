"""Tools of the hostile-input campaign (issue 26): raw clients, a scripted raw upstream, a listener
standing for "any other host", and the same proxy twice (fast path on and off) to compare verdicts.

Everything is raw bytes on loopback, so what is tested is exactly what crosses the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httptools
import pytest

from llmtally.config import Config, ServerConfig, UpstreamsConfig
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.proxy.test_fastpath import Answer
from tests.proxy.test_fastpath import _Reader as AnswerReader

#: The longest any one exchange may take before the suite calls it a hang.
ANSWER_WITHIN_S = 3.0
#: With every expected answer in, this much silence means the proxy has nothing more to say.
QUIET_S = 0.05

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHAT = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
CHAT_PATH = "/openai/v1/chat/completions"


# Client side ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What a client got for what it sent: the answers in order, and whether the proxy closed."""

    answers: list[Answer]
    closed: bool
    raw: bytes
    #: The bytes were not valid HTTP/1.1 (the proxy broke the framing).
    garbled: str | None = None

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers if a.status]

    @property
    def summary(self) -> tuple[str, ...]:
        """What the two front ends must agree on: the status class of each complete answer (``4xx``),
        ``cut`` for an answer that stopped short, or ``closed`` when the proxy closed without one."""
        if not self.answers:
            return ("closed",)
        return tuple(f"{a.status // 100}xx" if a.complete else "cut" for a in self.answers)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def exchange(
    port: int,
    writes: Sequence[bytes],
    answers: int = 1,
    pause_s: float = 0.0,
    within_s: float = ANSWER_WITHIN_S,
) -> Verdict:
    """Send ``writes`` on one new connection (``pause_s`` between them) and read what comes back until
    the proxy closes, or ``answers`` answers are complete and it stays quiet; a hang fails the test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parser = AnswerReader(reader)  # its parser only: reads here stop at a close or a quiet spell
    reading = Reading()

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for i, data in enumerate(writes):
                if i and pause_s:
                    await asyncio.sleep(pause_s)
                writer.write(data)
                await writer.drain()

    sender = asyncio.create_task(send())

    def finished() -> bool:
        return sum(a.complete for a in parser.answers) >= answers and sender.done()

    try:
        async with asyncio.timeout(within_s):
            await read_answers(reader, parser, finished, QUIET_S, reading)
    except TimeoutError:
        pytest.fail(f"no answer and no close within {within_s} s; got {bytes(reading.raw[:300])!r}")
    finally:
        sender.cancel()
        writer.close()
    return Verdict(parser.answers, reading.closed, bytes(reading.raw), reading.garbled)


@dataclass
class Reading:
    """What came back on a connection so far."""

    raw: bytearray = field(default_factory=bytearray)
    closed: bool = False
    #: Why the bytes stopped parsing as HTTP answers (None: they did not).
    garbled: str | None = None


async def read_answers(
    reader: asyncio.StreamReader,
    parser: AnswerReader,
    finished: Callable[[], bool],
    quiet_s: float,
    reading: Reading,
) -> None:
    """Read into ``reading`` (and ``parser``) until the peer closes, or ``finished()`` holds and
    nothing more comes for ``quiet_s``."""
    while True:
        try:
            if finished():
                data = await asyncio.wait_for(reader.read(65536), quiet_s)
            else:
                data = await reader.read(65536)
        except TimeoutError:
            return  # every answer is in and nothing more comes
        except ConnectionError:
            reading.closed = True
            return
        if not data:
            reading.closed = True
            return
        reading.raw += data
        if reading.garbled is None:
            try:
                parser.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                pass
            except httptools.HttpParserError as exc:
                reading.garbled = f"{type(exc).__name__}: {exc}"


def post(path: str = CHAT_PATH, body: bytes = CHAT, extra: str = "", host: str = "proxy") -> bytes:
    """A metered call as raw bytes (Content-Length framed)."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


# Loopback servers --------------------------------------------------------------------------------


@dataclass
class CountingListener:
    """A listener standing for "any other host": it only counts the connections it accepts."""

    accepted: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()


@contextlib.asynccontextmanager
async def counting_listener() -> AsyncIterator[CountingListener]:
    listener = CountingListener()
    listener.server = await asyncio.start_server(listener._accept, "127.0.0.1", 0)
    listener.port = listener.server.sockets[0].getsockname()[1]
    try:
        yield listener
    finally:
        listener.server.close()


class UpstreamConn:
    """One connection to the :class:`RawUpstream`, as a script sees it."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        #: Every request read on this connection (head and body bytes as received).
        self.requests: list[bytes] = []

    async def read_request(self) -> bytes:
        """The next request (Content-Length or chunked framed); IncompleteReadError at EOF."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lowered = head.lower()
        body = b""
        if b"\r\ntransfer-encoding: chunked" in lowered:
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                body += size_line + chunk
                if size == 0:
                    break
        elif b"\r\ncontent-length:" in lowered:
            length = int(lowered.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            body = await self.reader.readexactly(length)
        self.requests.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed upstream does."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


#: What the upstream does on one connection: read requests, send exactly the bytes it chooses.
Script = Callable[[UpstreamConn], Awaitable[None]]


class RawUpstream:
    """A strict misbehaving upstream: each new connection runs the next script of ``scripts`` (the
    last one repeats), and every request it read is logged per connection."""

    def __init__(self, scripts: Sequence[Script]) -> None:
        assert scripts
        self.scripts = list(scripts)
        self.conns: list[UpstreamConn] = []
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[bytes]:
        return [request for conn in self.conns for request in conn.requests]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpstreamConn(len(self.conns), reader, writer)
        self.conns.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        script = self.scripts[min(conn.index, len(self.scripts) - 1)]
        try:
            await script(conn)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # stopped mid-script (a stall): not an error of the case
            pass
        finally:
            writer.close()
            if task is not None:
                self.tasks.discard(task)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def raw_upstream(*scripts: Script) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(scripts)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def respond_with(*answers: bytes) -> Script:
    """A script answering each request on its connection with the next of ``answers`` (the last one
    repeats), keeping the connection open."""

    async def script(conn: UpstreamConn) -> None:
        i = 0
        while True:
            await conn.read_request()
            await conn.send(answers[min(i, len(answers) - 1)])
            i += 1

    return script


def http_response(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def chat_completion(tag: str = "first", usage: str = '{"prompt_tokens":7,"completion_tokens":3}') -> bytes:
    """An OpenAI chat completion naming ``tag`` (so answers can be told apart) with ``usage``."""
    return (
        f'{{"id":"chatcmpl-{tag}","object":"chat.completion","model":"gpt-4o-2024-08-06",'
        f'"choices":[{{"index":0,"message":{{"role":"assistant","content":"{tag}"}},"finish_reason":"stop"}}],'
        f'"usage":{usage}}}'
    ).encode()


# The proxy, twice --------------------------------------------------------------------------------

FAST_PATHS = pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "aiohttp"])


def campaign_config(base_url: str, fast_path: bool, **upstreams: float | int) -> Config:
    """Small limits, so oversized bodies and stalls are found in well under a second."""
    limits = dataclasses.replace(
        UpstreamsConfig(), connect_timeout_s=2.0, first_byte_timeout_s=1.0, read_timeout_s=1.0, **upstreams
    )
    config = Config(server=ServerConfig(max_request_body_mb=1, fast_path=fast_path), upstreams=limits)
    return config_for_upstream(base_url, config)


@contextlib.asynccontextmanager
async def proxy_pair(base_url: str, **upstreams: float | int) -> AsyncIterator[dict[bool, RunningProxy]]:
    """The same proxy with the fast path on and off, in front of ``base_url``."""
    proxies = {}
    try:
        for fast_path in (True, False):
            proxies[fast_path] = await start_proxy(campaign_config(base_url, fast_path, **upstreams))
        yield proxies
    finally:
        for proxy in proxies.values():
            await proxy.stop()


@contextlib.asynccontextmanager
async def one_proxy(base_url: str, fast_path: bool, **upstreams: float | int) -> AsyncIterator[RunningProxy]:
    proxy = await start_proxy(campaign_config(base_url, fast_path, **upstreams))
    try:
        yield proxy
    finally:
        await proxy.stop()


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing was logged with a traceback, and nothing at ERROR (how llmtally and asyncio report
    their own failures)."""
    bad = [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()
    ]
    assert not bad, bad
