"""The metered calls' upstream client against scripted raw HTTP/1.1 servers on loopback (and TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
from yarl import URL

from llmtally.config import UpstreamsConfig
from llmtally.proxy.upstream import (
    HIGH_WATER,
    Origin,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamReadTimeout,
)
from tests.proxy.helpers import LEFTOVERS

#: How a scripted server answers one request: it gets the request bytes and the writer.
Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Scripted:
    """A raw server that reads one request at a time and answers it with ``answer``."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.answer(request, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def scripted(answer: Answer, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
    server = Scripted(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def url(server: Scripted, path: str = "/v1/chat/completions", scheme: str = "http") -> URL:
    host = "localhost" if scheme == "https" else "127.0.0.1"
    return URL(f"{scheme}://{host}:{server.port}{path}")


async def _ok(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
    )
    await writer.drain()


HEADERS = [("Authorization", "Bearer sk-test"), ("Content-Type", "application/json")]


async def test_a_whole_response_and_the_connection_is_reused() -> None:
    pool = UpstreamPool()
    async with scripted(_ok) as server:
        for _ in range(3):
            target = URL(f"http://127.0.0.1:{server.port}/v1/x?a=%2F", encoded=True)
            response = await pool.post(target, HEADERS, b'{"q":1}')
            assert (response.status, response.reason) == (200, "OK")
            assert response.headers["content-type"] == "application/json"
            assert response.body_if_complete() == b'{"ok":true}'
        assert server.connections == 1
    first = server.requests[0]
    # Exactly what was given, plus Host and Content-Length: nothing added, the target as sent.
    assert first == (
        b"POST /v1/x?a=%2F HTTP/1.1\r\nHost: 127.0.0.1:" + str(server.port).encode() + b"\r\n"
        b"Authorization: Bearer sk-test\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"
        b'{"q":1}'
    )
    pool.close()


async def test_a_chunked_stream_arrives_piece_by_piece() -> None:
    release = asyncio.Event()

    async def stream(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(stream) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        assert response.body_arrived and not response.complete
        pieces = []
        async for chunk in response.chunks():
            pieces.append(chunk)
            release.set()  # the second piece is sent only once the first was read
        assert pieces == [b"data: 1", b"data: 2"]
        again = await pool.post(url(server), HEADERS, b"{}")
        # Both pieces are there at once this time: they come as one (nothing waits for more).
        assert [c async for c in again.chunks()] == [b"data: 1data: 2"]
        assert server.connections == 1
    pool.close()


async def test_a_body_delimited_by_close_ends_at_eof_and_is_not_reused() -> None:
    async def until_close(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    pool = UpstreamPool()
    async with scripted(until_close) as server:
        for _ in range(2):
            response = await pool.post(url(server), HEADERS, b"{}")
            assert b"".join([c async for c in response.chunks()]) == b"all of it"
        assert server.connections == 2
    pool.close()


async def test_informational_responses_are_skipped() -> None:
    async def hints(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nhi")
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(hints) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        assert response.status == 201
        assert "Link" not in response.headers and response.headers["X-Final"] == "yes"
        assert response.body_if_complete() == b"hi"
    pool.close()


async def test_an_upstream_cut_mid_body_fails_the_body() -> None:
    async def cut(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    pool = UpstreamPool()
    async with scripted(cut) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        received = []
        with pytest.raises(UpstreamDisconnected):
            async for chunk in response.chunks():
                received.append(chunk)
        assert received == [b"only this"]
    pool.close()


async def test_silence_past_the_first_byte_or_read_timeout_fails_the_head_or_the_body() -> None:
    async def silent(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(request) > 0 and b"/head-then-stall" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool(UpstreamsConfig(first_byte_timeout_s=0.2, read_timeout_s=0.2))
    async with scripted(silent) as server:
        with pytest.raises(UpstreamReadTimeout):
            await pool.post(url(server, "/no-head"), HEADERS, b"{}")
        response = await pool.post(url(server, "/head-then-stall"), HEADERS, b"{}")
        with pytest.raises(UpstreamReadTimeout):
            async for _ in response.chunks():
                pass
        response.close()
    pool.close()


async def test_the_first_byte_timeout_and_the_read_timeout_are_separate() -> None:
    async def slow_head(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.5)  # a model thinking: longer than the read timeout, within the first-byte one
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n")
        await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool(UpstreamsConfig(first_byte_timeout_s=5, read_timeout_s=0.2))
    async with scripted(slow_head) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        assert response.status == 200
        received = []
        with pytest.raises(UpstreamReadTimeout, match=r"sent nothing for 0\.2 s"):
            async for chunk in response.chunks():
                received.append(chunk)
        response.close()
    assert received == [b"x"]
    pool.close()


async def test_the_read_timeout_counts_silence_not_the_whole_body() -> None:
    async def trickle(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s of body, a byte every 0.1 s: never 0.2 s of silence
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool(UpstreamsConfig(read_timeout_s=0.2))
    async with scripted(trickle) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        received = []
        loop_time = asyncio.get_running_loop().time
        last_byte = loop_time()
        with pytest.raises(UpstreamReadTimeout):
            async for chunk in response.chunks():
                received.append(chunk)
                last_byte = loop_time()
        silent_for = loop_time() - last_byte
        response.close()
    assert b"".join(received) == b"x" * 6
    assert 0.15 < silent_for < 0.5  # failed after the read timeout of silence, counted from the last byte
    pool.close()


async def test_connect_failures_say_what_failed() -> None:
    pool = UpstreamPool(UpstreamsConfig(connect_timeout_s=1))
    async with scripted(_ok) as server:
        port = server.port
    with pytest.raises(UpstreamConnectError, match=f"127.0.0.1:{port}"):
        await pool.post(URL(f"http://127.0.0.1:{port}/v1/x"), HEADERS, b"{}")


async def test_max_connections_makes_calls_wait_for_a_free_connection() -> None:
    release = asyncio.Event()

    async def slow(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await _ok(request, reader, writer)

    pool = UpstreamPool(UpstreamsConfig(connect_timeout_s=0.3, max_connections=1))
    async with scripted(slow) as server:
        first = asyncio.ensure_future(pool.post(url(server), HEADERS, b"{}"))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamConnectTimeout):
            await pool.post(url(server), HEADERS, b"{}")
        waiting = asyncio.ensure_future(pool.post(url(server), HEADERS, b"{}"))
        await asyncio.sleep(0.05)
        release.set()
        assert (await first).body_if_complete() == b'{"ok":true}'  # frees the one connection
        assert (await waiting).body_if_complete() == b'{"ok":true}'
        assert server.connections == 1
    pool.close()


async def test_a_pooled_connection_the_upstream_closed_is_not_used() -> None:
    async def answer_then_close(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await _ok(request, reader, writer)
        writer.close()  # without Connection: close, as a server ending an idle keep-alive does

    pool = UpstreamPool()
    async with scripted(answer_then_close) as server:
        assert (await pool.post(url(server), HEADERS, b"{}")).body_if_complete() == b'{"ok":true}'
        await asyncio.sleep(0.1)  # the close reaches the pool
        assert (await pool.post(url(server), HEADERS, b"{}")).body_if_complete() == b'{"ok":true}'
        assert server.connections == 2
    pool.close()


async def test_a_slow_reader_pauses_the_upstream_and_gets_every_byte() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def large(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(large) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        await asyncio.sleep(0.2)  # the upstream sends while nobody reads
        conn = response._conn
        assert conn is not None and conn.paused  # reading stopped near HIGH_WATER, not at 1 MB
        received = bytearray()
        async for chunk in response.chunks():
            received += chunk
        assert bytes(received) == body
    pool.close()


async def test_invalid_http_is_a_protocol_error() -> None:
    async def garbage(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(garbage) as server:
        with pytest.raises(UpstreamProtocolError):
            await pool.post(url(server), HEADERS, b"{}")
    pool.close()


async def test_a_cancelled_call_closes_its_connection() -> None:
    async def never(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # returns at the client's close: no answer ever
        raise ConnectionError("closed by the client")

    pool = UpstreamPool()
    async with scripted(never) as server:
        call = asyncio.ensure_future(pool.post(url(server), HEADERS, b"{}"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(server.closed_by_client.wait(), 2)  # the upstream stops generating


async def test_https_verifies_the_upstream_certificate() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    async with scripted(_ok, server_context) as server:
        pool = UpstreamPool(ssl_context=trusting)
        response = await pool.post(url(server, scheme="https"), HEADERS, b"{}")
        assert response.body_if_complete() == b'{"ok":true}'
        assert server.requests[0].split(b"\r\n")[1] == b"Host: localhost:" + str(server.port).encode()
        pool.close()
        # The system trust store does not know this authority: refused, not sent.
        with pytest.raises(UpstreamConnectError, match="SSLCertVerificationError"):
            await UpstreamPool().post(url(server, scheme="https"), HEADERS, b"{}")


def test_the_host_header_names_the_origin_as_a_client_would() -> None:
    assert Origin.of(URL("https://api.openai.com/v1")).host_header == "api.openai.com"
    assert Origin.of(URL("http://127.0.0.1:8080/x")).host_header == "127.0.0.1:8080"
    assert Origin.of(URL("http://[::1]:8080/x")).host_header == "[::1]:8080"
    assert Origin.of(URL("https://[2001:db8::1]/x")).host_header == "[2001:db8::1]"


# A connection is reused only when its parser is idle with no bytes left over -------------------

_OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("later", [False, True], ids=["same read", "later read"])
@pytest.mark.parametrize("extra", list(LEFTOVERS.values()), ids=list(LEFTOVERS))
async def test_bytes_after_a_response_keep_its_connection_from_being_reused(
    extra: bytes, later: bool
) -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if b"/first" in request:
            writer.write(_OK_2 if later else _OK_2 + extra)
            await writer.drain()
            if later:
                await asyncio.sleep(0.05)
                writer.write(extra)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nright")
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(answer) as server:
        first = await pool.post(url(server, "/first"), HEADERS, b"{}")
        assert first.body_if_complete() == b"ok"  # the answer itself stands
        await asyncio.sleep(0.1)
        second = await pool.post(url(server, "/second"), HEADERS, b"{}")
        assert second.body_if_complete() == b"right"  # never the first exchange's bytes
    assert server.connections == 2
    pool.close()


async def test_a_trailing_crlf_after_a_response_leaves_the_parser_idle_and_the_connection_reused() -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_OK_2 + b"\r\n")  # llhttp skips empty lines between messages (RFC 9112 §2.2)
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(answer) as server:
        for _ in range(2):
            response = await pool.post(url(server), HEADERS, b"{}")
            assert response.body_if_complete() == b"ok"
    assert server.connections == 1
    pool.close()


_BROKEN_BODIES = {
    "invalid chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "overflowing chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n",
}


@pytest.mark.parametrize("answer_bytes", list(_BROKEN_BODIES.values()), ids=list(_BROKEN_BODIES))
async def test_a_body_that_fails_in_the_read_of_its_head_is_told_not_left_hanging(
    answer_bytes: bytes,
) -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer_bytes)
        await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool(UpstreamsConfig(first_byte_timeout_s=30))
    async with scripted(answer) as server:
        response = await asyncio.wait_for(pool.post(url(server), HEADERS, b"{}"), 5)
        assert response.status == 200
        assert isinstance(response.error, UpstreamProtocolError)
        assert not response.body_arrived
        with pytest.raises(UpstreamProtocolError, match=r"(?i)chunk size"):
            async for _ in response.chunks():
                pass
        response.close()
    pool.close()


async def test_an_upstream_101_is_a_protocol_error_not_an_escape() -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nxx")
        await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool()
    async with scripted(answer) as server:
        with pytest.raises(UpstreamProtocolError, match="switched protocols"):
            await asyncio.wait_for(pool.post(url(server), HEADERS, b"{}"), 5)
    pool.close()


_BIG_HEADS = {
    "a 1 MiB header in one read": [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok"
    ],
    "a 9 KB header": [b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok"],
    "200 headers": [
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        + b"Content-Length: 2\r\n\r\nok"
    ],
    "a head that never ends, in pieces": [b"HTTP/1.1 200 OK\r\n"] + [b"X-A: " + b"a" * 8000 + b"\r\n"] * 200,
    "a long status line": [b"HTTP/1.1 200 " + b"O" * 9000 + b"\r\nContent-Length: 2\r\n\r\nok"],
}


@pytest.mark.parametrize("pieces", list(_BIG_HEADS.values()), ids=list(_BIG_HEADS))
async def test_a_response_head_past_the_limits_fails_the_call(pieces: list[bytes]) -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        await asyncio.sleep(10)

    pool = UpstreamPool()
    async with scripted(answer) as server:
        with pytest.raises(UpstreamProtocolError, match=r"head|header|status line"):
            await asyncio.wait_for(pool.post(url(server), HEADERS, b"{}"), 10)
    pool.close()


async def test_a_response_head_within_the_limits_is_read() -> None:
    async def answer(request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 8000) for i in range(100))
        writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    pool = UpstreamPool()
    async with scripted(answer) as server:
        response = await pool.post(url(server), HEADERS, b"{}")
        assert response.body_if_complete() == b"ok"
        assert len(response.headers) == 101
    pool.close()
