"""Helpers for end-to-end proxy tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import httptools
from aiohttp import web

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFIX = {"openai": "/openai", "anthropic": "/anthropic", "gemini": "/gemini"}


async def only_record(proxy: RunningProxy) -> dict[str, Any]:
    records = await proxy.flush()
    assert len(records) == 1, records
    record = records[0]
    proxy.records.clear()
    return record


async def first_record(proxy: RunningProxy, timeout_s: float = 5.0) -> dict[str, Any]:
    """The one record of a call whose record comes later (a disconnect, a drain)."""
    for _ in range(int(timeout_s / 0.1)):
        if await proxy.flush():
            break
        await asyncio.sleep(0.1)
    return await only_record(proxy)


def money(value: Any) -> Decimal | None:
    """Record costs are Decimal in memory (JSON numbers on the wire)."""
    return None if value is None else Decimal(str(value))


async def replay(proxy: RunningProxy, upstream: FakeUpstream, provider: str) -> tuple[bytes, bytes]:
    """Send the request the upstream last saw, directly and through the proxy; return both bodies."""
    seen = upstream.seen
    headers = {k: v for k, v in seen.headers.items() if k.lower() not in ("host", "content-length")}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(upstream.url + seen.path_qs, data=seen.body, headers=headers) as direct:
            direct_body = await direct.read()
        async with session.post(
            proxy.url + PREFIX[provider] + seen.path_qs, data=seen.body, headers=headers
        ) as proxied:
            proxied_body = await proxied.read()
    return direct_body, proxied_body


def assert_usage(record: dict[str, Any], **expected: Any) -> None:
    got = {k: (money(record[k]) if k.endswith("_cost") else record[k]) for k in expected}
    want = {k: (Decimal(v) if k.endswith("_cost") and v is not None else v) for k, v in expected.items()}
    assert got == want, f"record {record}"


async def serve_post(path: str, handler: Handler) -> tuple[web.AppRunner, str]:
    """A one-route aiohttp server on a free loopback port (a scripted upstream or receiver): its runner
    (the caller cleans it up) and base URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class RawUpstream:
    """An upstream on loopback that answers each request with exactly the bytes a test scripts.

    ``answer(request)`` gets the raw request (head and body) and returns what to send: bytes, or a
    list of bytes and float pauses. Counts connections, keeps every request.
    """

    def __init__(self, answer: Callable[[bytes], bytes | list[bytes | float]]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                script = self.answer(request)
                for step in [script] if isinstance(script, bytes) else script:
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test ended while a script slept
        finally:
            writer.close()


class _AnswerEnd:
    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


async def raw_exchange(url: str, data: bytes | list[bytes | float], timeout_s: float = 5.0) -> bytes:
    """Send raw bytes (or pieces with pauses, while reading) to a proxy; what it answers, up to the end
    of its first answer or the close. A proxy silent for ``timeout_s`` shows as ``<no answer>``."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    end = _AnswerEnd()
    parser = httptools.HttpResponseParser(end)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for step in [data] if isinstance(data, bytes) else data:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif not writer.is_closing():
                    writer.write(step)
                    await writer.drain()

    sending = asyncio.create_task(send())
    got = b""
    try:
        while not end.done:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout_s)
            except TimeoutError:
                return got + b"<no answer>"
            except ConnectionError:
                return got + b"<reset>"
            if not chunk:
                return got
            got += chunk
            with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
                parser.feed_data(chunk)
        return got
    finally:
        sending.cancel()
        writer.close()


def status_of(answer: bytes) -> int:
    """The status code of the first answer in ``answer`` (0: none)."""
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


#: What a misbehaving upstream sends after a complete response (never to reach the next call).
LEFTOVERS = {
    "an unsolicited second response": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nLEAK",
    "a partial head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "a partial second body": b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nLEAK",
    "bytes past Content-Length": b"LEAKLEAK",
}
