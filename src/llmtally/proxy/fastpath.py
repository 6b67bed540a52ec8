"""The proxy port's front end: metered calls take a lean path; everything else is aiohttp's.

aiohttp's server machinery costs about 150 µs of CPU per request before a handler runs, and on a
2-core sidecar that queueing is most of the latency llmtally adds (docs/performance.md has the
measurements, and uvicorn's and granian's for comparison). A *metered call* is a POST with a
Content-Length body to a route a provider adapter meters. For those, the connection's own protocol
reads the request with llhttp (httptools; aiohttp's own parser wraps the same C library), forwards
it as a :class:`llmtally.proxy.app.MeteredCall` (what aiohttp's handler runs too) and writes the
answer to the socket itself (through the loop's :class:`~llmtally.proxy.outbox.Outbox`, which sends
it once the loop has run the callbacks of the events it polled together).

Any other request (passthrough paths, health and metrics, chunked or ``Expect: 100-continue``
uploads, HTTP/1.0, percent-encoded paths, malformed or oversized heads, bodies above
``max_request_body_mb``) hands its connection, bytes and all, to aiohttp's own protocol for the
rest of the connection's life: its limits, errors and routes apply unchanged. The runner, the
sites, the signals and graceful shutdown stay aiohttp's too; ``[server] fast_path = false`` turns
the lean path off.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import parse_qsl

import httptools
from aiohttp import web
from multidict import MultiDict

from llmtally.providers import ADAPTERS, Endpoint
from llmtally.proxy.app import JSON_TYPE, STATE_KEY, MeteredCall, ProxyState, error_body, new_metered_call
from llmtally.record import Provider

log = logging.getLogger("llmtally.proxy")

#: A request head larger than this goes to aiohttp (whose line and field limits then answer it).
MAX_HEAD = 64 * 1024
#: Bytes a client may send ahead while its call is in flight before reading pauses (pipelining).
MAX_AHEAD = 256 * 1024
#: Idle keep-alive connections close after this long (aiohttp's own default).
KEEPALIVE_S = 75.0
#: A response body up to this size is joined to its head for one send; larger ones go as two.
JOIN_BELOW = 64 * 1024

_NO_QUERY: MultiDict[str] = MultiDict()


def proxy_runner(app: web.Application) -> web.AppRunner:
    """The runner for a proxy app (every form of serving, and the test harness).

    Handlers are cancelled when their client goes away, so an upstream call that is silent (a model
    thinking before its first token) is closed or drained at once, not at its next byte; at shutdown
    in-flight calls get ``shutdown_grace_s``.
    """
    return _ProxyRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=app[STATE_KEY].config.server.shutdown_grace_s,
        handler_cancellation=True,
    )


class _ProxyRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        state = self.app[STATE_KEY]
        if not state.config.server.fast_path:
            return server
        # The runner and its sites use a server only as the protocol factory and for
        # pre_shutdown()/shutdown(); FastPathServer provides those and delegates to aiohttp's.
        return cast(web.Server, FastPathServer(server, state))


class FastPathServer:
    """The protocol factory the proxy port listens with: aiohttp's server behind a lean hot path."""

    def __init__(self, aiohttp_server: web.Server, state: ProxyState) -> None:
        self.aiohttp_server = aiohttp_server
        self.state = state
        self.max_body = state.config.server.max_request_body_mb * 1024 * 1024
        assert state.outbox is not None  # made at startup, before the runner makes its server
        #: Every write to a client goes through it, so its writes keep their order.
        self.outbox = state.outbox
        self.connections: set[_Connection] = set()
        self.closing = False

    def __call__(self) -> asyncio.Protocol:
        return _Connection(self)

    def pre_shutdown(self) -> None:
        """Stop taking calls: idle connections close now, busy ones after their answer."""
        self.closing = True
        self.aiohttp_server.pre_shutdown()
        for conn in list(self.connections):
            if conn.metered is None:
                conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's API)
        """Calls in flight get ``timeout`` to finish, then are cancelled (and recorded as cut off)."""
        await asyncio.gather(self.aiohttp_server.shutdown(timeout), self._shutdown_fast_path(timeout))

    async def _shutdown_fast_path(self, timeout: float | None) -> None:  # noqa: ASYNC109
        busy = [conn for conn in self.connections if conn.metered is not None]
        if busy:
            loop = asyncio.get_running_loop()
            for conn in busy:
                conn.done_waiter = loop.create_future()
            waiters = {conn.done_waiter for conn in busy if conn.done_waiter is not None}
            _, pending = await asyncio.wait(waiters, timeout=timeout)
            for conn in busy:
                if conn.metered is not None:
                    conn.metered.cancel()  # recorded as cut off at shutdown
            if pending:
                await asyncio.wait(pending, timeout=timeout)
        for conn in list(self.connections):
            conn.close()


@dataclass(slots=True)
class _Call:
    """A metered call whose head is parsed; its body may still be arriving."""

    provider: Provider
    endpoint: Endpoint
    raw_path: str
    headers: list[tuple[str, str]]
    query: MultiDict[str]
    keep_alive: bool
    #: Bytes of head plus body: where the next request starts.
    end: int
    head_size: int


class _Connection(asyncio.Protocol):
    """One client connection while it makes metered calls (a :class:`~llmtally.proxy.app.Downstream`)."""

    def __init__(self, server: FastPathServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.received: bytes | bytearray = b""
        #: How far ``received`` has been searched for the end of a head.
        self.scanned = 0
        self.call: _Call | None = None
        #: The call being answered (requests behind it wait in ``received``).
        self.metered: MeteredCall | None = None
        #: Set at shutdown while a call is being answered: resolved when it is done.
        self.done_waiter: asyncio.Future[None] | None = None
        self.keep_alive = True
        self.lost = False
        self.reading_paused = False
        self.writing_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.last_active = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        # The answer being written.
        self.answer_started = False
        self.chunked = False
        self.held_head: bytes | None = None
        # Filled by the parser's callbacks while a head is parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []

    # asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport
        self.server.connections.add(self)
        self.idle_timer = self.loop.call_at(self.last_active + KEEPALIVE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self.received:
            if isinstance(self.received, bytes):
                self.received = bytearray(self.received)
            self.received += data
        else:
            self.received = data
        if self.metered is None:
            self._take_requests()
        elif len(self.received) > MAX_AHEAD and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._forget()
        if self.metered is not None:
            self.metered.cancel()  # as aiohttp's handler_cancellation: the client is gone
        self._wake_writer(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer(None)

    # Reading requests ---------------------------------------------------------------------------

    def _take_requests(self) -> None:
        """Start the next call if its whole request is here; hand anything else to aiohttp."""
        received = self.received
        if self.call is None:
            # Search only what is new (and the 3 bytes before it): a head sent a byte at a time
            # must not be rescanned from its start at every byte.
            head_end = received.find(b"\r\n\r\n", self.scanned)
            if head_end < 0:
                if len(received) > MAX_HEAD:
                    self._hand_off()
                else:
                    self.scanned = max(0, len(received) - 3)
                return
            self.scanned = 0
            call = self._parse_head(bytes(received[: head_end + 4]))
            if call is None:
                self._hand_off()
                return
            self.call = call
        call = self.call
        if len(received) < call.end:
            return
        body = bytes(received[call.head_size : call.end])
        self.received = bytes(received[call.end :]) if len(received) > call.end else b""
        self.call = None
        self.keep_alive = call.keep_alive and not self.server.closing
        self.answer_started = self.chunked = False
        self.held_head = None
        metered = new_metered_call(
            self.server.state, self, call.provider, call.endpoint, call.raw_path, call.headers, body,
            call.query, time.perf_counter(),
        )  # fmt: skip
        if metered is None:  # answered at once
            self._after_answer()
            return
        self.metered = metered
        metered.on_done = self._call_done
        metered.begin()

    def _parse_head(self, head: bytes) -> _Call | None:
        """The call this head starts, or None when it is not a metered call for the lean path."""
        self._url, self._headers = b"", []
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return None  # aiohttp answers malformed requests with its own 400
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return None
        length = None
        for name, value in self._headers:
            low = name.lower()
            if low == "content-length":
                if length is not None or not (value.isascii() and value.isdigit()):
                    return None
                length = int(value)
            elif low in ("transfer-encoding", "expect", "upgrade"):
                return None
        if length is None or length > self.server.max_body:
            return None
        raw_path = self._url.decode("utf-8", "surrogateescape")
        path, _, query = raw_path.partition("?")
        provider, slash, tail = path[1:].partition("/")
        if not slash or not path.startswith("/") or "%" in path or "#" in raw_path:
            return None
        adapter = ADAPTERS.get(cast(Provider, provider))
        endpoint = adapter.route(tail) if adapter is not None else None
        if endpoint is None:
            return None
        return _Call(
            provider=cast(Provider, provider),
            endpoint=endpoint,
            raw_path=raw_path,
            headers=self._headers,
            query=MultiDict(parse_qsl(query, keep_blank_values=True)) if query else _NO_QUERY,
            keep_alive=parser.should_keep_alive(),
            end=len(head) + length,
            head_size=len(head),
        )

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them; the upstream client encodes the same way, so every byte goes on.
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def _hand_off(self) -> None:
        """aiohttp's protocol takes over this connection, from the request not yet answered."""
        transport = self.transport
        if transport is None or self.lost:
            return
        received, self.received = self.received, b""
        self._forget()
        self.server.outbox.flush()  # the answers before it go first
        handler = self.server.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.reading_paused:
            transport.resume_reading()
        if received:
            handler.data_received(bytes(received))

    # Serving one call ---------------------------------------------------------------------------

    def _call_done(self, failure: BaseException | None) -> None:
        self.metered = None
        if failure is not None:
            # The client left, or shutdown cut the call off (both recorded), or a bug, which must
            # not leave the client hanging.
            self.keep_alive = False
            if not isinstance(failure, asyncio.CancelledError | ConnectionResetError):
                log.error("the proxy failed on a metered call", exc_info=failure)
                if not self.answer_started:
                    self.send_whole(500, "", [JSON_TYPE], error_body("internal_error", "llmtally failed"))
        waiter, self.done_waiter = self.done_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._after_answer()

    def _after_answer(self) -> None:
        if not self.keep_alive or self.server.closing or self.lost:
            self.close()
            return
        self.last_active = self.loop.time()
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.received:
            self._take_requests()

    # Downstream (see llmtally.proxy.app) ----------------------------------------------------------

    def gone(self) -> bool:
        return self.lost or self.transport is None or self.transport.is_closing()

    def send_whole(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer_started = True
        if self.gone():
            return
        assert self.transport is not None
        bodyless = _bodyless(status)
        head = self._head(status, reason, headers, None if bodyless else len(body))
        outbox = self.server.outbox
        if bodyless:
            outbox.write(self.transport, head)
        elif len(body) < JOIN_BELOW:
            outbox.write(self.transport, head + body)
        else:
            outbox.write(self.transport, head)
            outbox.write(self.transport, body)

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], hold_head: bool) -> None:
        self.answer_started = True
        has_length = any(name.lower() == "content-length" for name, _ in headers)
        self.chunked = not has_length and not _bodyless(status)
        head = self._head(status, reason, headers, None)
        if hold_head:
            self.held_head = head
        else:
            await self._send(head)

    async def write(self, data: bytes) -> None:
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.held_head is not None:
            data, self.held_head = self.held_head + data, None
        await self._send(data)

    async def finish(self) -> None:
        data = b"0\r\n\r\n" if self.chunked else b""
        if self.held_head is not None:
            data, self.held_head = self.held_head + data, None
        if data:
            await self._send(data)

    def abort(self) -> None:
        self.keep_alive = False
        self.close()

    # Helpers ------------------------------------------------------------------------------------

    def _head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif self.chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1", "replace")

    async def _send(self, data: bytes) -> None:
        if self.gone():
            raise ConnectionResetError("the client closed the connection")
        assert self.transport is not None
        self.server.outbox.write(self.transport, data)
        if self.writing_paused:  # the client reads slower than the upstream sends: wait for it
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.lost or self.transport is None:
            return
        now = self.loop.time()
        if self.metered is None and now - self.last_active >= KEEPALIVE_S:
            self.close()
            return
        self.idle_timer = self.loop.call_at(max(now, self.last_active) + KEEPALIVE_S, self._check_idle)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.server.outbox.flush()  # what is held for it goes before the close
            self.transport.close()

    def _forget(self) -> None:
        self.server.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "Unknown")


def _bodyless(status: int) -> bool:
    return status < 200 or status in (204, 304)
