"""A lean fake upstream and load generator for the load test, so the harness barely uses the CPU.

With two cores shared by the load generator, the upstream and the proxy under test, an aiohttp client
and server on both ends used more CPU than the proxy itself and their queueing showed up as "added
latency". Both ends here are raw asyncio protocols on uvloop with llhttp (httptools) parsing:

* The upstream answers with canned bytes captured once from :class:`llmtally.testing.FakeUpstream`
  (so every provider's wire format is exactly the test fake's), after a fixed delay; streams send their
  text events at a fixed cadence, then the closing events at once.
* The generator drives persistent connections at fixed concurrency (closed loop) or at a fixed offered
  rate (open loop, latency measured from the scheduled send time, so a slow target is not flattered).

    python load_tests/lean.py upstream --port P --latency-ms 50 --chunks 20 --chunk-interval-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import aiohttp
import httptools

#: (provider, stream) → the request each load cell sends: path after the provider prefix, body.
REQUESTS: dict[tuple[str, bool], tuple[str, bytes]] = {
    ("openai", False): (
        "/v1/chat/completions",
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello"}]}',
    ),
    ("openai", True): (
        "/v1/chat/completions",
        b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Say hello"}]}',
    ),
    ("anthropic", False): (
        "/v1/messages",
        b'{"model":"claude-sonnet-5","max_tokens":64,"messages":[{"role":"user","content":"Say hello"}]}',
    ),
    ("anthropic", True): (
        "/v1/messages",
        b'{"model":"claude-sonnet-5","max_tokens":64,"stream":true,'
        b'"messages":[{"role":"user","content":"Say hello"}]}',
    ),
    ("gemini", False): (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        b'{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}',
    ),
    ("gemini", True): (
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        b'{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}',
    ),
}
#: Claude on Bedrock (InvokeModel and its stream): the model in the URL, ``anthropic_version`` in the body.
BEDROCK_MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"
_BEDROCK_BODY = (
    b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":64,'
    b'"messages":[{"role":"user","content":"Say hello"}]}'
)
REQUESTS[("bedrock", False)] = (f"/model/{BEDROCK_MODEL}/invoke", _BEDROCK_BODY)
REQUESTS[("bedrock", True)] = (f"/model/{BEDROCK_MODEL}/invoke-with-response-stream", _BEDROCK_BODY)
AUTH = {
    # Bedrock: the fake's API key, so the capture passes its check; through the proxy (signing =
    # "resign") the client's Authorization is dropped and the call signed again for the upstream. The
    # lean upstream checks no signature.
    "bedrock": "Authorization: Bearer ABSKZmFrZS1iZWRyb2NrLWFwaS1rZXk=",
    "openai": "Authorization: Bearer sk-load",
    "anthropic": "x-api-key: sk-load",
    "gemini": "x-goog-api-key: k",
}


@dataclass(frozen=True)
class Canned:
    content_type: str
    #: The body (non-streamed), or the stream's events; ``pieces`` of them come at the cadence.
    events: list[bytes]
    stream: bool


#: OpenAI sends a stream's usage only when asked (``stream_options.include_usage``), as llmtally does by
#: default for the streams it meters: the upstream answers that request with the usage chunk, like OpenAI.
OPENAI_USAGE_STREAM = ("openai+usage", True)
_UPSTREAM_ONLY = {
    OPENAI_USAGE_STREAM: (
        "/v1/chat/completions",
        b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"Say hello"}]}',
    ),
}


async def capture(chunks: int, piece_chars: int) -> dict[tuple[str, bool], Canned]:
    """Each provider's responses, as the test fake sends them."""
    from llmtally.testing import FakeUpstream, FakeUpstreamConfig

    fake = FakeUpstream(FakeUpstreamConfig(chunks=chunks, piece_chars=piece_chars))
    url = await fake.start()
    canned = {}
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for (provider, stream), (path, body) in (REQUESTS | _UPSTREAM_ONLY).items():
                name, value = AUTH[provider.split("+")[0]].split(": ")
                async with session.post(url + path, data=body, headers={name: value}) as response:
                    assert response.status == 200, (provider, stream, response.status)
                    data = await response.read()
                    kind = response.headers["Content-Type"]
                if provider == "bedrock" and stream:
                    events = _frames(data)
                else:
                    events = [e for e in _EVENT_END.split(data) if e] if stream else [data]
                canned[(provider, stream)] = Canned(kind, events, stream)
    finally:
        await fake.stop()
    return canned


def _frames(data: bytes) -> list[bytes]:
    """An AWS event-stream body cut into its messages (each starts with its 4-byte total length)."""
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(data[:size])
        data = data[size:]
    return out


#: After an SSE event's blank line (Gemini ends lines with CRLF, the others with LF).
_EVENT_END = re.compile(rb"(?<=\r\n\r\n)|(?<=\n\n)")
_GEMINI = re.compile(rb":(stream)?[gG]enerateContent")


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection of the lean upstream."""

    def __init__(self, server: LeanUpstream) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        url = self.url
        gemini = _GEMINI.search(url)
        if url.startswith(b"/model/"):
            key = ("bedrock", url.endswith(b"-stream"))
        elif gemini:
            key = ("gemini", gemini.group(1) is not None)
        elif url.startswith(b"/v1/messages"):
            key = ("anthropic", b'"stream":true' in body)
        elif b'"stream":true' not in body:
            key = ("openai", False)
        else:
            key = OPENAI_USAGE_STREAM if b'"include_usage":true' in body else ("openai", True)
        self.server.respond(self, self.server.canned[key])


@dataclass
class LeanUpstream:
    canned: dict[tuple[str, bool], Canned]
    latency_s: float
    interval_s: float
    pieces: int

    def respond(self, conn: UpstreamProtocol, canned: Canned) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self.latency_s, self._headers, conn, canned)

    def _headers(self, conn: UpstreamProtocol, canned: Canned) -> None:
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if not canned.stream:
            (body,) = canned.events
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (canned.content_type.encode(), len(body), body)
            )
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (
            canned.content_type.encode()
        )
        transport.write(head + _chunk(canned.events[0]))
        self._next(transport, canned.events, 1)

    def _next(self, transport: asyncio.Transport, events: list[bytes], index: int) -> None:
        if transport.is_closing():
            return
        # The first `pieces` events (after the opening one) come at the cadence; the rest at once.
        if index <= self.pieces and index < len(events):
            if index > 1:
                transport.write(_chunk(events[index - 1]))
            asyncio.get_running_loop().call_later(self.interval_s, self._next, transport, events, index + 1)
            return
        transport.write(b"".join(_chunk(e) for e in events[index - 1 :]) + b"0\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def run_upstream(args: argparse.Namespace) -> None:
    canned = await capture(args.chunks, args.piece_chars)
    server = LeanUpstream(canned, args.latency_ms / 1000, args.chunk_interval_ms / 1000, args.chunks)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: UpstreamProtocol(server), "127.0.0.1", args.port, backlog=4096
    )
    print(f"lean upstream on http://127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()


# --- the load generator ---------------------------------------------------------------------------


@dataclass
class Samples:
    latency_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    errors: int = 0
    overhead_ms: list[float] = field(default_factory=list)


class ClientConnection(asyncio.Protocol):
    """One persistent connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[int] | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.header_name = b""
        self.overhead: float | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-llmtally-overhead-ms":
            self.overhead = float(value)

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    async def call(self, request: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first = self.last = self.overhead = None
        self.gaps = []
        self.transport.write(request)
        return await self.done


def build_request(host: str, port: int, prefix: str, provider: str, stream: bool) -> bytes:
    path, body = REQUESTS[(provider, stream)]
    return (
        f"POST {prefix}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n{AUTH[provider]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connect(host: str, port: int) -> ClientConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(ClientConnection, host, port)
    return conn


def _record(samples: Samples, conn: ClientConnection, start: float, end: float, status: int) -> None:
    if status != 200:
        samples.errors += 1
        return
    samples.latency_ms.append((end - start) * 1000)
    if conn.first is not None:
        samples.ttfb_ms.append((conn.first - start) * 1000)
    samples.gap_ms.extend(g * 1000 for g in conn.gaps)
    if conn.overhead is not None:
        samples.overhead_ms.append(conn.overhead)


async def closed_loop(
    host: str, port: int, request: bytes, concurrency: int, duration: float, warmup: float
) -> Samples:
    """``concurrency`` clients, each sending its next request as soon as the last one completes."""
    samples = Samples()
    conns = await asyncio.gather(*(_connect(host, port) for _ in range(concurrency)))
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def client(conn: ClientConnection) -> None:
        while (t0 := time.perf_counter()) < stop_at:
            try:
                status = await asyncio.wait_for(conn.call(request), 60)
            except (ConnectionError, TimeoutError, httptools.HttpParserError):
                if t0 >= measure_from:
                    samples.errors += 1
                conn = await _reconnect(conn, host, port)
                continue
            if t0 >= measure_from:
                _record(samples, conn, t0, time.perf_counter(), status)

    await asyncio.gather(*(client(c) for c in conns))
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return samples


async def _reconnect(conn: ClientConnection, host: str, port: int) -> ClientConnection:
    if conn.transport is not None:
        conn.transport.close()
    try:
        return await _connect(host, port)
    except OSError:
        await asyncio.sleep(0.1)
        return await _connect(host, port)


async def open_loop(
    host: str, port: int, request: bytes, rate: float, duration: float, warmup: float, max_conns: int = 2048
) -> Samples:
    """Requests at a fixed offered rate; each waits for an idle connection (or opens one)."""
    samples = Samples()
    idle: list[ClientConnection] = []
    opened = 0
    start = time.perf_counter() + 0.05
    total = int(rate * (warmup + duration))
    measure_from = start + warmup
    tasks = []

    async def one(due: float) -> None:
        nonlocal opened
        conn = idle.pop() if idle else None
        if conn is None:
            if opened >= max_conns:
                samples.errors += 1
                return
            opened += 1
            conn = await _connect(host, port)
        try:
            status = await asyncio.wait_for(conn.call(request), 60)
        except (ConnectionError, TimeoutError, httptools.HttpParserError):
            if due >= measure_from:
                samples.errors += 1
            if conn.transport is not None:
                conn.transport.close()
            opened -= 1
            return
        if due >= measure_from:
            _record(samples, conn, due, time.perf_counter(), status)  # from the scheduled time
        idle.append(conn)

    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.gather(*tasks)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--latency-ms", type=float, default=50.0)
    up.add_argument("--chunks", type=int, default=20)
    up.add_argument("--chunk-interval-ms", type=float, default=5.0)
    up.add_argument("--piece-chars", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(run_upstream(args))


if __name__ == "__main__":
    main()
