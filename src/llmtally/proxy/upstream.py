"""The upstream client for metered calls: HTTP/1.1 keep-alive connections on the event loop, llhttp parsing.

Metered calls are the proxy's hot path, and aiohttp's client was its largest cost (a third of a
worker's CPU per call in the profile: request and response objects, timers, header processing). The
proxy knows exactly what it sends — a POST whose body is already in memory, to one of three
configured origins — so this client does only that: write the head and body in one send, parse the
answer with llhttp (httptools, as uvicorn does), hand body bytes over as they arrive with flow
control, and put the connection back in its origin's pool when the response ended cleanly.
Unmetered passthrough calls (uploads, GETs, anything else) keep aiohttp's general client.

A call can wait for its answer's head two ways: ``await`` :meth:`UpstreamPool.post`, or hand
:meth:`UpstreamPool.send` a :class:`ResponseListener` that the connection calls back once the head
(and whatever body came with it) is parsed. The proxy's hot path takes the second way on a pooled
connection: no task, future or coroutine frame per call (docs/performance.md, "The callback path").

Like aiohttp, a POST is never retried (RFC 9112 §9.3.1): a pooled connection the upstream closed is
noticed and dropped before use; one that closes as it is used fails the call with 502.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from llmtally.config import HeadLimits, UpstreamsConfig
from llmtally.proxy.egress import Egress, EgressProxy, connect_failure, connect_through
from llmtally.proxy.outbox import Outbox

#: Bytes a reason phrase may not hold (RFC 9112 §4: HTAB, SP, VCHAR and obs-text only).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Body bytes buffered ahead of the reader before the upstream socket stops being read.
HIGH_WATER = 256 * 1024
#: How long an idle pooled connection is kept (aiohttp's default; providers close idle ones later).
KEEPALIVE_S = 15.0


class UpstreamError(Exception):
    """The upstream call failed; the message says how."""


class UpstreamConnectError(UpstreamError):
    """No connection: refused, unresolvable, TLS failure."""


class UpstreamConnectTimeout(UpstreamError, TimeoutError):
    """No connection within ``connect_timeout_s`` (or every allowed connection stayed busy)."""


class UpstreamReadTimeout(UpstreamError, TimeoutError):
    """The upstream sent nothing for ``read_timeout_s``."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed the connection before the response ended."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's answer is not valid HTTP/1.1 (or is over the head limits)."""


class _StopParsing(Exception):
    """Raised inside an llhttp callback to stop the parser (a head past the limits, a second message)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: URL) -> Origin:
        assert url.host is not None and url.port is not None
        return cls(url.scheme, url.host, url.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class ResponseListener(Protocol):
    """Told once how a request sent with :meth:`UpstreamPool.send` went (from the connection's callbacks)."""

    def response_arrived(self, response: UpstreamResponse) -> None:
        """The head is here, with any body bytes that came with it; the listener now owns ``response``
        (read it, then release or close it)."""
        ...

    def response_failed(self, exc: UpstreamError) -> None:
        """No head: the upstream failed, closed or stayed silent past ``read_timeout_s`` (the connection
        is closed)."""
        ...


class UpstreamResponse:
    """One response: status and headers at once, the body as it arrives (:meth:`chunks`)."""

    __slots__ = (
        "_buffered",
        "_conn",
        "_done",
        "_error",
        "_read_timeout",
        "_size",
        "_timer",
        "_wait_since",
        "_waiter",
        "headers",
        "loop",
        "reason",
        "status",
    )

    def __init__(self, conn: UpstreamConnection, read_timeout: float) -> None:
        self._conn: UpstreamConnection | None = conn
        #: Kept, not looked up per wait: asyncio.get_running_loop() costs a getpid() syscall each time.
        self.loop = conn.loop
        self._read_timeout = read_timeout
        self._buffered: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wait_since = 0.0
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    @property
    def complete(self) -> bool:
        """The whole body has arrived (all of it is in :meth:`body_if_complete`'s reach)."""
        return self._done and self._error is None

    @property
    def error(self) -> BaseException | None:
        """Why the body cannot be read to its end (it failed after the head), or None."""
        return self._error

    @property
    def body_arrived(self) -> bool:
        """Some body bytes are already here (they came with the head)."""
        return bool(self._buffered)

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has all arrived already (no wait), else None."""
        if not self.complete:
            return None
        body = b"".join(self._buffered)
        self._buffered.clear()
        self._size = 0
        self.release()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises :class:`UpstreamError` if the body is cut short."""
        while True:
            if self._buffered:
                # Everything already here goes on as one piece (one send to the client, one parse
                # call): no waiting for more, just no per-read overhead when reads pile up.
                buffered = self._buffered
                chunk = buffered.popleft() if len(buffered) == 1 else b"".join(buffered)
                buffered.clear()
                self._size = 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._done:
                self.release()
                return
            await self._wait()

    async def _wait(self) -> None:
        loop = self.loop
        self._waiter = waiter = loop.create_future()
        # One read timer per response, not one per wait (a stream waits once per event): when it
        # fires it checks how long the current wait has lasted, and re-arms if not long enough.
        self._wait_since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._wait_since + self._read_timeout, self._check_silence)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_silence(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None:
            return  # not waiting now: the next wait arms the timer again
        deadline = self._wait_since + self._read_timeout
        if self.loop.time() >= deadline:
            _expire(waiter, self._read_timeout)
        else:
            self._timer = self.loop.call_at(deadline, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Done with this response: its connection goes back to the pool if the body ended cleanly."""
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.response_released(reusable=self.complete)

    def close(self) -> None:
        """Abandon the response and close its connection (the upstream stops generating)."""
        self._stop_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # Called by the connection ----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> bool:
        """Buffer body bytes; True when the reader is this far behind and reading should pause."""
        self._buffered.append(data)
        self._size += len(data)
        self._wake()
        return self._size > HIGH_WATER

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._done = True
            self._wake()


def _expire(waiter: asyncio.Future[None], after_s: float) -> None:
    if not waiter.done():
        waiter.set_exception(_silence(after_s))


def _silence(after_s: float) -> UpstreamReadTimeout:
    return UpstreamReadTimeout(f"the upstream sent nothing for {after_s:g} s")


class _HeadWaiter:
    """The listener :meth:`UpstreamPool.post` awaits: the head as a future's result."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[UpstreamResponse]) -> None:
        self.future = future

    def response_arrived(self, response: UpstreamResponse) -> None:
        if not self.future.done():
            self.future.set_result(response)

    def response_failed(self, exc: UpstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an origin; one request at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        #: Waiting for the head of ``response``; told at the end of the read that completes it.
        self.listener: ResponseListener | None = None
        self.head_parsed = False
        #: ``response`` has ended: any byte after it means the connection is out of step.
        self.message_done = False
        self.head_timer: asyncio.TimerHandle | None = None
        self.first_byte_timeout = 0.0
        #: Bytes of the head read so far (bounded by the pool's head limits).
        self.head_bytes = 0
        self.over_limit = ""
        self.header_pairs: list[tuple[str, str]] = []
        self.reason = b""
        self.keep_alive = True
        self.paused = False
        self.closed = False
        self.idle_since = 0.0
        #: Body framing from the headers: without length or chunking, the body ends at EOF.
        self.delimited = True

    # asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or self.message_done:
            # Bytes nobody asked for, or past the end of the response: this connection is out of
            # step with its requests and must never carry another client's call.
            self.keep_alive = False
            self.close()
            return
        if not self.head_parsed:
            self.head_bytes += len(data)
        broken: UpstreamProtocolError | None = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            broken = UpstreamProtocolError("the upstream switched protocols (101), not an answer to a POST")
        except httptools.HttpParserError as exc:
            broken = self._parse_failure(exc)
        if broken is None and not self.head_parsed and self.head_bytes > self.pool.head_limits.max_head_bytes:
            limit = self.pool.head_limits.max_head_bytes
            broken = UpstreamProtocolError(f"the upstream's response head is over {limit} bytes")
        if broken is not None:
            self.keep_alive = False
            self._fail(broken)  # tells a listener still waiting for the head
        listener = self.listener
        if listener is not None and self.head_parsed:
            # Told after the whole read is parsed, so a small answer is already complete; the
            # listener may reuse this connection at once, so nothing here touches it afterwards.
            # A body that failed in this same read is told too: the listener answers the client.
            self._stop_head_timer()
            self.listener = None
            listener.response_arrived(response)
        if broken is not None:
            self.close()  # never reused: the listener cannot have handed it on

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is not None and self.head_parsed and not self.delimited:
            response._finish()  # a body delimited by the end of the connection
        else:
            self._fail(UpstreamDisconnected("the upstream closed the connection mid-response"))

    def _parse_failure(self, exc: httptools.HttpParserError) -> UpstreamProtocolError | None:
        """What a parse error means for the response (None: it stands, the connection does not)."""
        if self.over_limit:
            return UpstreamProtocolError(self.over_limit)
        if self.message_done:  # bytes after a complete response: out of step, never reused
            self.keep_alive = False
            return None
        return UpstreamProtocolError(f"invalid HTTP from the upstream: {exc}")

    # llhttp callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.message_done:
            raise _StopParsing  # a second message: stop parsing (the read ends the connection's reuse)

    def on_status(self, status: bytes) -> None:
        self.reason += status
        if len(self.reason) > self.pool.head_limits.max_line_bytes:
            self._over_limit("the upstream's status line is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.pool.head_limits
        if len(name) > limits.max_field_bytes or len(value) > limits.max_field_bytes:
            self._over_limit(f"a header of the upstream's response is over {limits.max_field_bytes} bytes")
        if len(self.header_pairs) >= limits.max_headers:
            self._over_limit(f"the upstream's response has more than {limits.max_headers} headers")
        self.header_pairs.append((name.decode("latin-1"), value.decode("latin-1")))

    def _over_limit(self, why: str) -> None:
        self.over_limit = why
        raise _StopParsing(why)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            return  # llhttp stops at an upgrade (HttpParserUpgrade): answered as a protocol error
        if 100 <= status < 200:  # informational (103 Early Hints): the real answer follows
            self.header_pairs, self.reason = [], b""
            self.head_bytes = 0
            return
        response = self.response
        assert response is not None
        headers: CIMultiDict[str] = CIMultiDict(self.header_pairs)
        response.status = status
        # llhttp lets control bytes (NUL...) through in a reason phrase; passed on, they break the
        # client's status line (aiohttp refuses to write it: a traceback). The status code's own
        # phrase is used instead.
        reason = self.reason
        response.reason = "" if _CONTROL.search(reason) else reason.decode("latin-1")
        response.headers = CIMultiDictProxy(headers)
        self.delimited = (
            "content-length" in headers
            or "chunked" in headers.get("transfer-encoding", "").lower()
            or status in (204, 304)
        )
        self.keep_alive = self.parser.should_keep_alive()
        self.header_pairs, self.reason = [], b""
        self.head_parsed = True

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and response._feed(body):
            self.pause()

    def on_message_complete(self) -> None:
        if not self.head_parsed:  # a 1xx message ended; keep waiting for the answer
            return
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.message_done = True
        if self.response is not None:
            self.response._finish()

    # Use -----------------------------------------------------------------------------------------

    def send(
        self, data: bytes, first_byte_timeout: float, read_timeout: float, listener: ResponseListener
    ) -> None:
        assert self.transport is not None
        self.response = UpstreamResponse(self, read_timeout)
        self.listener = listener
        self.head_parsed = self.message_done = False
        self.head_bytes = 0
        self.first_byte_timeout = first_byte_timeout
        self.head_timer = self.loop.call_at(self.loop.time() + first_byte_timeout, self._head_timed_out)
        outbox = self.pool.outbox
        if outbox is not None:
            outbox.write(self.transport, data)
        else:
            self.transport.write(data)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.listener is not None:
            self._fail(
                UpstreamReadTimeout(
                    f"the upstream sent no response head within {self.first_byte_timeout:g} s"
                )
            )
            self.close()

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def response_released(self, reusable: bool) -> None:
        self.response = None
        if reusable and self.keep_alive and not self.closed and not self.paused:
            self.pool.put_back(self)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection; a listener still waiting for its head is not told (it closed it)."""
        self.listener = None
        self._stop_head_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)

    def _fail(self, exc: UpstreamError) -> None:
        listener, response = self.listener, self.response
        if listener is not None and not self.head_parsed:
            self._stop_head_timer()
            self.listener = None
            listener.response_failed(exc)
        if response is not None:
            response._fail(exc)


class AbsoluteFormConnection(UpstreamConnection):
    """A connection to an http upstream through an egress proxy: each request line names the origin
    (``POST http://host:port/path``) and carries the proxy's credentials. Only such connections pay
    for the rewrite; a direct connection's requests go out as built."""

    def __init__(self, pool: UpstreamPool, origin: Origin, proxy: EgressProxy) -> None:
        super().__init__(pool, origin)
        self.target_prefix = f"POST http://{origin.host_header}".encode("latin-1")
        auth = proxy.authorization
        self.proxy_lines = f"Proxy-Authorization: {auth}\r\n".encode("latin-1") if auth else b""

    def send(
        self, data: bytes, first_byte_timeout: float, read_timeout: float, listener: ResponseListener
    ) -> None:
        assert data.startswith(b"POST /")  # as UpstreamPool.send builds every request
        line_end = data.index(b"\r\n") + 2
        rewritten = b"".join((self.target_prefix, data[5:line_end], self.proxy_lines, data[line_end:]))
        super().send(rewritten, first_byte_timeout, read_timeout, listener)


@dataclass
class UpstreamPool:
    """Keep-alive connections per origin, shared by every metered call of a proxy process."""

    #: ``connect_timeout_s``, ``read_timeout_s`` and ``max_connections`` (per origin; 0: no limit).
    limits: UpstreamsConfig = field(default_factory=UpstreamsConfig)
    ssl_context: ssl.SSLContext | None = None
    #: Requests leave through it, after the loop's current batch of callbacks; None: at once.
    outbox: Outbox | None = None
    #: Which origins go through an egress proxy (decided per new connection, never per call; an
    #: origin's route is fixed, so the pool's per-origin keys are per origin and route).
    egress: Egress = field(default_factory=Egress)
    #: A response head past these fails the call (502), as a request head past them gets a 400.
    head_limits: HeadLimits = field(default_factory=HeadLimits)
    _idle: dict[Origin, list[UpstreamConnection]] = field(default_factory=dict)
    _open: dict[Origin, set[UpstreamConnection]] = field(default_factory=dict)
    _opening: dict[Origin, int] = field(default_factory=dict)
    _waiters: dict[Origin, collections.deque[asyncio.Future[UpstreamConnection | None]]] = field(
        default_factory=dict
    )

    async def post(self, url: URL, headers: Iterable[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send ``body`` to ``url`` with exactly ``headers`` (plus Host and Content-Length); the head."""
        origin = Origin.of(url)
        conn = await self.connection(origin)
        waiter = _HeadWaiter(conn.loop.create_future())
        self.send(conn, url.raw_path_qs, headers, body, waiter)
        try:
            return await waiter.future
        except BaseException:  # failed, timed out, or the caller was cancelled: nobody reads this
            conn.close()
            raise

    def send(
        self,
        conn: UpstreamConnection,
        path_qs: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        listener: ResponseListener,
    ) -> None:
        """POST ``body`` to ``path_qs`` on ``conn`` with exactly ``headers`` (plus Host and
        Content-Length); ``listener`` is told how it went. Close ``conn`` to abandon the call."""
        lines = [f"POST {path_qs} HTTP/1.1\r\nHost: {conn.origin.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        # The server side decodes header bytes as UTF-8 with surrogateescape (aiohttp's way, and the
        # fast path's): encoding back the same way forwards every byte as it came, valid UTF-8 or not.
        head = "".join(lines).encode("utf-8", "surrogateescape")
        conn.send(head + body, self.limits.first_byte_timeout_s, self.limits.read_timeout_s, listener)

    def idle_connection(self, origin: Origin) -> UpstreamConnection | None:
        """A pooled connection to ``origin`` ready for a call now, or None (then :meth:`connection`)."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.close()
        return None

    async def connection(self, origin: Origin) -> UpstreamConnection:
        """A connection to ``origin`` for one call: pooled, handed over by a finished call, or new."""
        conn = self.idle_connection(origin)
        if conn is not None:
            return conn
        if asyncio.current_task() is None:
            # Started eagerly (proxy.fastpath.start_eagerly): the timeout below needs a task.
            await asyncio.sleep(0)
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                limit = self.limits.max_connections
                if limit and len(self._open.get(origin, ())) + self._opening.get(origin, 0) >= limit:
                    handed = await self._wait_for_connection(origin)
                    if handed is not None:
                        return handed
                return await self._connect(origin)
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"no connection to {origin.host}:{origin.port} within {self.limits.connect_timeout_s:g} s"
            ) from None

    async def _wait_for_connection(self, origin: Origin) -> UpstreamConnection | None:
        """At max_connections: wait for a connection handed over by a finished call (or for one to
        close, None: then this call may open its own)."""
        waiter: asyncio.Future[UpstreamConnection | None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(origin, collections.deque())
        waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:  # timed out, or the caller left: pass on what was handed
            if waiter.done() and not waiter.cancelled() and (handed := waiter.result()) is not None:
                self.put_back(handed)
            elif waiter.done() and not waiter.cancelled():
                self._wake_one(origin, None)
            raise
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def _wake_one(self, origin: Origin, conn: UpstreamConnection | None) -> bool:
        waiters = self._waiters.get(origin)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        ssl_context: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self.ssl_context is None:
                self.ssl_context = ssl.create_default_context()
            ssl_context = self.ssl_context
        proxy = self.egress.proxy_for(origin.scheme, origin.host, origin.port)
        self._opening[origin] = self._opening.get(origin, 0) + 1
        try:
            if proxy is None:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=ssl_context,
                    server_hostname=origin.host if ssl_context is not None else None,
                )
            else:
                factory: Callable[[], UpstreamConnection] = partial(UpstreamConnection, self, origin)
                if ssl_context is None:  # plain http: requests name the origin to the proxy
                    factory = partial(AbsoluteFormConnection, self, origin, proxy)
                _, conn = await connect_through(loop, proxy, origin.host, origin.port, factory, ssl_context)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(connect_failure(origin.host, origin.port, proxy, exc)) from exc
        finally:
            self._opening[origin] -= 1
        self._open.setdefault(origin, set()).add(conn)
        return conn

    def put_back(self, conn: UpstreamConnection) -> None:
        """A call is done with a healthy connection: to a waiting call, else to the idle pool."""
        if self._wake_one(conn.origin, conn):
            return
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.origin, [])
        while idle and now - idle[0].idle_since >= KEEPALIVE_S:  # oldest first: close the expired
            idle[0].close()
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: it leaves the pool, and a call waiting for a free slot may connect."""
        open_ = self._open.get(conn.origin)
        if open_ is not None and conn in open_:
            open_.discard(conn)
            self._wake_one(conn.origin, None)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close every connection (at shutdown, after in-flight calls finished)."""
        for conns in list(self._open.values()):
            for conn in list(conns):
                conn.close()
        self._idle.clear()
