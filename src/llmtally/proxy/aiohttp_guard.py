"""aiohttp's protocols with the guards llmtally's own have: a head deadline, quiet client errors
(server), and connections never reused out of step (client).

aiohttp has no deadline for a request head, so a client dribbling one byte at a time holds a
connection (and its buffers) for ever; and it logs every malformed request at ERROR with a
traceback, a log flood any client can trigger. :class:`GuardedRequestHandler` adds the deadline
(``[server] head_timeout_s``: 408, then close) and logs client errors (the 400s aiohttp's parser
answers) at DEBUG in one line. Bodies are held to ``min_body_rate_bytes_s`` where the proxy reads
them (:func:`body_deadline_s`). Everything else is aiohttp's own protocol, unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, cast

import aiohttp
import httptools
import orjson
from aiohttp import http_exceptions, web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError

from llmtally.config import ServerConfig

log = logging.getLogger("llmtally.proxy")


def _timeout_answer() -> bytes:
    body = b'{"error": {"type": "request_timeout", "message": "the request arrived too slowly", '
    body += b'"source": "llmtally"}}'
    head = (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


TIMEOUT_ANSWER = _timeout_answer()


#: What each of aiohttp's parse errors means, said without the bytes it quotes.
_CLIENT_ERRORS: dict[type[BaseException], str] = {
    http_exceptions.BadHttpMethod: "the request method is not valid",
    http_exceptions.BadStatusLine: "the request line is not valid HTTP/1.1",
    http_exceptions.InvalidURLError: "the request target is not valid",
    http_exceptions.InvalidHeader: "a header is not valid",
    http_exceptions.LineTooLong: "a request line or header is over the [server] head limits",
    http_exceptions.ContentLengthError: "the body does not match its Content-Length",
    http_exceptions.TransferEncodingError: "the chunked body is not valid",
    http_exceptions.ContentEncodingError: "the body is not valid in its Content-Encoding",
}


def body_deadline_s(server: ServerConfig, length: int) -> float | None:
    """How long a request body of ``length`` bytes may take to arrive (None: no limit)."""
    if server.min_body_rate_bytes_s <= 0:
        return None
    return server.body_grace_s + length / server.min_body_rate_bytes_s


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making :class:`GuardedRequestHandler` protocols."""

    head_timeout_s: float = 0.0

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    @classmethod
    def guard(cls, server: web.Server, config: ServerConfig) -> GuardedServer:
        """Turn the server an aiohttp runner made into a guarded one (same object, same state)."""
        # aiohttp's runner builds the server from the app's private parts; this class adds no state
        # of aiohttp's, so changing the class changes only the protocol it makes.
        server.__class__ = cls
        guarded = cast(GuardedServer, server)
        guarded.head_timeout_s = config.head_timeout_s
        return guarded


class GuardedRequestHandler(web.RequestHandler):
    """One client connection on aiohttp's protocol, with a deadline for each request head."""

    __slots__ = ("_head_timer", "_heads_before")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_before = 0

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a head arrived whole: its body is the handler's to time
            self._stop_head_timer()
        elif self._head_timer is None and data and self._current_request is None and not self._messages:
            timeout = self._manager_timeout()
            if timeout > 0:
                self._heads_before = heads
                self._head_timer = self._loop.call_later(timeout, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def start_head_deadline(self, remaining_s: float) -> None:
        """A connection handed over mid-head (from the fast path) keeps the deadline it had."""
        self._stop_head_timer()
        self._heads_before = self._request_count
        self._head_timer = self._loop.call_later(max(remaining_s, 0.0), self._head_too_slow)

    def _manager_timeout(self) -> float:
        manager = self._manager
        return manager.head_timeout_s if isinstance(manager, GuardedServer) else 0.0

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._request_count != self._heads_before:
            return
        log.debug("a request head did not arrive within head_timeout_s: 408")
        transport.write(TIMEOUT_ANSWER)
        self.force_close()
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a malformed request, without its quote of the offending bytes (which
        is often the line holding the client's API key) in the body or the log."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        what = _CLIENT_ERRORS.get(type(exc), "the request is not valid HTTP/1.1")
        log.debug("bad request (%s): %s", type(exc).__name__, what)
        if request.writer.output_size > 0:  # as aiohttp: an answer is already on its way
            raise ConnectionError("the response has started: no error answer can follow")
        body = orjson.dumps({"error": {"type": "bad_request", "message": what, "source": "llmtally"}})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):  # the client's malformed request, answered 400
            log.debug("bad request (%s)", type(exc).__name__)  # its message quotes the bytes
            return
        super().log_exception(*args, **kw)


class GuardedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, never reused once the upstream sent what no request asked for.

    aiohttp keeps a pooled connection whose upstream sent bytes while it was idle (an unsolicited
    response is parsed and queued, then handed to the next request on that connection — another
    client's), and it reuses one whose last read carried bytes past the response (a partial head).
    A second llhttp parser follows the framing: bytes when no answer is due close the connection at
    once, and bytes past the answer's end keep it from being reused.
    """

    __slots__ = ("_answer_due", "_answer_status", "_shadow")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._answer_due = False
        self._answer_status = 0
        self._shadow: httptools.HttpResponseParser | None = None

    def set_response_params(self, **kwargs: Any) -> None:
        """Called as each request is sent: one answer (after any 1xx) is now due."""
        super().set_response_params(**kwargs)
        self._answer_due = True
        # A HEAD's answer has no body, which llhttp cannot be told: such a connection is not reused.
        self._shadow = None if kwargs.get("skip_payload") else httptools.HttpResponseParser(self)
        if self._shadow is None:
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if not self._answer_due and data:
            self.force_close()  # bytes nobody asked for: never hand them to the next request
            if self.transport is not None:
                self.transport.close()
            return
        shadow = self._shadow
        if shadow is not None and data:
            try:
                shadow.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self.force_close()  # aiohttp's own parser gives its verdict on the answer below
        super().data_received(data)

    # The second parser's callbacks (llhttp calls them on this protocol).

    def on_message_begin(self) -> None:
        if not self._answer_due:
            self.force_close()  # a message after the answer: out of step
            raise _OutOfStep

    def on_headers_complete(self) -> None:
        assert self._shadow is not None
        self._answer_status = self._shadow.get_status_code()

    def on_message_complete(self) -> None:
        if self._answer_status >= 200:  # informational answers (1xx) come before the real one
            self._answer_due = False


class _OutOfStep(Exception):
    """Stops the second parser at a message nobody asked for."""


def guard_client_connector(connector: aiohttp.BaseConnector) -> None:
    """Make ``connector`` open :class:`GuardedResponseHandler` protocols (aiohttp keeps the factory in
    a private attribute; a test fails if that ever changes)."""
    loop = connector._loop
    cast(Any, connector)._factory = functools.partial(GuardedResponseHandler, loop=loop)
