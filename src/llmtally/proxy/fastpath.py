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
uploads, HTTP/1.0, Upgrade and CONNECT, percent-encoded paths, a missing or repeated Host, bare-LF
line ends, malformed heads or heads past the ``[server]`` head limits, bodies above
``max_request_body_mb``) hands its connection, bytes and all, to aiohttp's own protocol for the
rest of the connection's life: its limits, errors and routes apply unchanged, so every verdict on
such input is aiohttp's. A head that does not arrive within ``head_timeout_s``, or a body slower
than ``min_body_rate_bytes_s`` (after ``body_grace_s``), is answered 408 and the connection closed.
The runner, the sites, the signals and graceful shutdown stay aiohttp's too; ``[server] fast_path =
false`` turns the lean path off.
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

from llmtally.platforms import Route
from llmtally.proxy.aiohttp_guard import GuardedServer
from llmtally.proxy.app import JSON_TYPE, STATE_KEY, MeteredCall, ProxyState, error_body, new_metered_call

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


class _Silent:
    """Callbacks for a parser that only checks bytes (none: llhttp skips what is not defined)."""


_SILENT = _Silent()


def proxy_runner(app: web.Application) -> web.AppRunner:
    """The runner for a proxy app (every form of serving, and the test harness).

    Handlers are cancelled when their client goes away, so an upstream call that is silent (a model
    thinking before its first token) is closed or drained at once, not at its next byte; at shutdown
    in-flight calls get ``shutdown_grace_s``.
    """
    server = app[STATE_KEY].config.server
    return _ProxyRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=server.shutdown_grace_s,
        handler_cancellation=True,
        # The same head limits as the fast path and the upstream clients.
        max_line_size=server.max_line_bytes,
        max_field_size=server.max_field_bytes,
        max_headers=server.max_headers,
    )


class _ProxyRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        state = self.app[STATE_KEY]
        server = GuardedServer.guard(await super()._make_server(), state.config.server)
        if not state.config.server.fast_path:
            return server
        # The runner and its sites use a server only as the protocol factory and for
        # pre_shutdown()/shutdown(); FastPathServer provides those and delegates to aiohttp's.
        return cast(web.Server, FastPathServer(server, state))


class FastPathServer:
    """The protocol factory the proxy port listens with: aiohttp's server behind a lean hot path."""

    def __init__(self, aiohttp_server: GuardedServer, state: ProxyState) -> None:
        self.aiohttp_server = aiohttp_server
        self.state = state
        server = state.config.server
        self.max_body = server.max_request_body_mb * 1024 * 1024
        self.limits = server.head_limits
        self.head_timeout = server.head_timeout_s
        self.body_grace = server.body_grace_s
        self.min_body_rate = server.min_body_rate_bytes_s
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

    route: Route
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
        #: Armed while a request is only partly here: its head, or its body, must arrive by then.
        self.request_timer: asyncio.TimerHandle | None = None
        # The answer being written.
        self.answer_started = False
        self.chunked = False
        #: Body bytes the answer's Content-Length still promises (None: chunked or whole).
        self.unsent: int | None = None
        self.held_head: bytes | None = None
        #: llhttp fed a head that is still arriving (``probed`` bytes of it), to refuse garbage early.
        self.head_probe: httptools.HttpRequestParser | None = None
        self.probed = 0
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
        self._stop_request_timer()
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
                if len(received) > MAX_HEAD or _bare_lf(received, self.scanned) or self._not_a_head():
                    # aiohttp answers: 400 for a bare LF or bytes no request starts with (a body
                    # longer than its Content-Length), its limits for the size.
                    self._hand_off()
                    return
                if self.request_timer is None:
                    self._start_request_timer(self.server.head_timeout)
                self.scanned = max(0, len(received) - 3)
                return
            self.scanned = 0
            self.head_probe = None
            call = self._parse_head(bytes(received[: head_end + 4])) if head_end < MAX_HEAD else None
            if call is None:
                self._hand_off()
                return
            self.call = call
            if len(received) < call.end:
                self._body_deadline(call.end - call.head_size)
        call = self.call
        if len(received) < call.end:
            return
        self._stop_request_timer()
        body = bytes(received[call.head_size : call.end])
        self.received = bytes(received[call.end :]) if len(received) > call.end else b""
        self.call = None
        self.keep_alive = call.keep_alive and not self.server.closing
        self.answer_started = self.chunked = False
        self.unsent = self.held_head = None
        metered = new_metered_call(
            self.server.state, self, call.route, call.raw_path, call.headers, body,
            call.query, time.perf_counter(),
        )  # fmt: skip
        if metered is None:  # answered at once
            self._after_answer()
            return
        self.metered = metered
        metered.on_done = self._call_done
        metered.begin()

    def _not_a_head(self) -> bool:
        """Whether the partial head in ``received`` is already invalid, so that waiting for its end
        would only wait for the head timer. llhttp is fed just the bytes it has not seen."""
        if self.head_probe is None:
            self.head_probe = httptools.HttpRequestParser(_SILENT)
            self.probed = 0
        received = self.received
        try:
            self.head_probe.feed_data(bytes(received[self.probed :]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return True
        self.probed = len(received)
        return False

    def _parse_head(self, head: bytes) -> _Call | None:
        """The call this head starts, or None when it is not a metered call for the lean path."""
        self._url, self._headers = b"", []
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None  # aiohttp answers malformed requests with its own 400; it serves Upgrade/CONNECT
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return None
        limits = self.server.limits
        if len(self._url) > limits.max_line_bytes or len(self._headers) > limits.max_headers:
            return None
        length = None
        hosts = 0
        max_field = limits.max_field_bytes
        for name, value in self._headers:
            if len(name) > max_field or len(value) > max_field:
                return None
            low = name.lower()
            if low == "content-length":
                if length is not None or not (value.isascii() and value.isdigit()):
                    return None
                length = int(value)
            elif low == "host":
                hosts += 1
            elif low in ("transfer-encoding", "expect", "upgrade"):
                return None
        if length is None or length > self.server.max_body or hosts != 1:
            return None
        if not self._url.isascii():
            return None  # aiohttp answers 400: a request target is ASCII
        raw_path = self._url.decode("ascii")
        path, _, query = raw_path.partition("?")
        prefix, slash, tail = path[1:].partition("/")
        if not slash or not path.startswith("/") or "%" in path or "#" in raw_path:
            return None
        platform = self.server.state.platforms.get(prefix)
        if platform is None:
            return None
        params = MultiDict(parse_qsl(query, keep_blank_values=True)) if query else _NO_QUERY
        route = platform.route("POST", tail, params)
        if route is None or route.endpoint is None:  # aiohttp answers (a refusal, or a passthrough)
            return None
        return _Call(
            route=route,
            raw_path=raw_path,
            headers=self._headers,
            query=params,
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
        deadline = self.request_timer.when() if self.request_timer is not None else None
        self._stop_request_timer()
        self.server.outbox.flush()  # the answers before it go first
        handler = self.server.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if deadline is not None:  # the head's deadline goes with it
            handler.start_head_deadline(deadline - self.loop.time())
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
        lengths = [value for name, value in headers if name.lower() == "content-length"]
        if len(lengths) == 1 and lengths[0].strip().isdigit():
            self.unsent = 0 if _bodyless(status) else int(lengths[0])
        elif lengths:  # the upstream's framing cannot be trusted: do not promise it on
            headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
        self.chunked = self.unsent is None and not _bodyless(status)
        head = self._head(status, reason, headers, None)
        if hold_head:
            self.held_head = head
        else:
            await self._send(head)

    async def write(self, data: bytes) -> None:
        unsent = self.unsent
        if unsent is not None:  # never more than the head promised: the client reads the next answer after
            if len(data) > unsent:
                data = data[:unsent]
            self.unsent = unsent - len(data)
        elif self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.held_head is not None:
            data, self.held_head = self.held_head + data, None
        await self._send(data)

    async def finish(self) -> None:
        if self.unsent:  # shorter than promised: only closing tells the client the answer is over
            self.keep_alive = False
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

    def _start_request_timer(self, after_s: float) -> None:
        """A head began arriving: it must be whole within ``after_s`` (0: no deadline)."""
        if after_s > 0:
            self.request_timer = self.loop.call_at(self.loop.time() + after_s, self._request_too_slow)

    def _body_deadline(self, length: int) -> None:
        """The head is here, the body not yet: it must come at ``min_body_rate_bytes_s`` after the grace."""
        server = self.server
        self._stop_request_timer()
        if server.min_body_rate > 0:
            allowed = server.body_grace + length / server.min_body_rate
            self.request_timer = self.loop.call_at(self.loop.time() + allowed, self._request_too_slow)

    def _stop_request_timer(self) -> None:
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None

    def _request_too_slow(self) -> None:
        """Slowloris: a head or body dribbled in keeps a connection for ever unless cut off."""
        self.request_timer = None
        if self.lost or self.metered is not None:
            return
        self.received, self.call = b"", None
        self.keep_alive = False
        self.send_whole(408, "", [JSON_TYPE], error_body("request_timeout", "the request arrived too slowly"))
        self.close()

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


def _bare_lf(data: bytes | bytearray, start: int) -> bool:
    """Whether ``data`` has a line feed without its carriage return at or after ``start``."""
    lf = data.find(b"\n", start)
    while lf >= 0:
        if lf == 0 or data[lf - 1] != 0x0D:
            return True
        lf = data.find(b"\n", lf + 1)
    return False
