"""The lean front end: metered calls on the fast path, every other request handed to aiohttp.

Raw sockets on loopback, so what crosses the wire (pipelining, keep-alive, framing) is exact.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import httptools
import orjson
import pytest
from aiohttp import web

from llmtally.config import Config, ServerConfig
from llmtally.proxy import fastpath
from llmtally.proxy.fastpath import FastPathServer
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import first_record, raw_exchange, serve_post, status_of

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
STREAM_CHAT = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def metered_post(body: bytes = CHAT, path: str = "/openai/v1/chat/completions", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def chunked_post(body: bytes = CHAT, extra: str = "") -> bytes:
    """A metered call uploaded chunked (no Content-Length): the fast path hands it to aiohttp."""
    head = (
        f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    return head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = True


class _Reader:
    """Reads whole HTTP/1.1 answers off one connection, in order."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Answer())

    def on_status(self, status: bytes) -> None:
        self.answers[-1].status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body

    def on_message_complete(self) -> None:
        self.answers[-1].complete = True
        self.answers[-1].keep_alive = self.parser.should_keep_alive()

    async def answers_until(self, count: int) -> list[Answer]:
        async with asyncio.timeout(10):
            while sum(a.complete for a in self.answers) < count:
                data = await self.reader.read(65536)
                assert data, "the proxy closed the connection early"
                self.parser.feed_data(data)
        return self.answers


async def connect(proxy: RunningProxy) -> tuple[_Reader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    return _Reader(reader), writer


def fast_path_of(proxy: RunningProxy) -> FastPathServer:
    server = proxy.runner.server
    assert isinstance(server, FastPathServer)
    return server


async def test_metered_calls_take_the_fast_path_and_the_rest_goes_to_aiohttp(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    fast = fast_path_of(proxy)
    answers, writer = await connect(proxy)
    writer.write(metered_post())
    first = (await answers.answers_until(1))[0]
    assert first.status == 200 and orjson.loads(first.body)["usage"]["prompt_tokens"] == 1200
    assert len(fast.connections) == 1  # still the fast path's, kept alive

    # A passthrough GET on the same connection: aiohttp's protocol takes the connection over.
    writer.write(
        f"GET /openai/v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
    )
    second = (await answers.answers_until(2))[1]
    assert second.status == 200 and b'"gpt-4o"' in second.body
    assert not fast.connections

    # Metered calls on the handed-over connection are served, and metered, by aiohttp's handler.
    writer.write(metered_post(STREAM_CHAT))
    third = (await answers.answers_until(3))[2]
    assert third.status == 200 and third.body.endswith(b"data: [DONE]\n\n")
    writer.close()
    records = await proxy.flush()
    assert [(r["stream"], r["input_tokens"], r["error"]) for r in records] == [
        (False, 1200, None),
        (True, 1200, None),
    ]


async def test_the_fast_path_answers_as_the_upstream_did(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    writer.write(metered_post(STREAM_CHAT))
    streamed = (await answers.answers_until(1))[0]
    writer.close()
    assert streamed.status == 200
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert streamed.headers["transfer-encoding"] == "chunked"  # the usage chunk is hidden: length changes
    assert streamed.headers["x-request-id"] == "req_fake_openai_0001"
    assert float(streamed.headers["x-llmtally-overhead-ms"]) >= 0
    assert b'"usage"' not in streamed.body  # the client did not ask for usage, so it sees none
    assert streamed.body.count(b"data: ") == upstream.config.chunks + 3  # role, pieces, finish, [DONE]


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    embed = b'{"model":"text-embedding-3-small","input":"hello"}'
    writer.write(metered_post() + metered_post(embed, "/openai/v1/embeddings") + metered_post(STREAM_CHAT))
    got = await answers.answers_until(3)
    writer.close()
    assert [a.status for a in got] == [200, 200, 200]
    assert b"chat.completion" in got[0].body and b'"embedding"' in got[1].body
    assert got[2].body.endswith(b"data: [DONE]\n\n")
    records = await proxy.flush()
    assert [r["endpoint"] for r in records] == ["chat.completions", "embeddings", "chat.completions"]


async def test_answers_held_for_the_end_of_the_loops_batch_go_before_a_handed_off_request(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # The fast path's writes wait in the outbox until the loop's callbacks have run; a request handed
    # to aiohttp right after an answer (a whole one, or a stream's last chunk) must not overtake them.
    proxy = await make_proxy()
    health = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
    for first in (metered_post(), metered_post(STREAM_CHAT)):
        answers, writer = await connect(proxy)
        writer.write(first + health)
        got = await answers.answers_until(2)
        writer.close()
        assert [a.status for a in got] == [200, 200]
        assert got[0].body.endswith((b"}", b"data: [DONE]\n\n"))
        assert orjson.loads(got[1].body) == {"status": "ok"}


async def test_a_request_arriving_in_pieces_is_served(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    request = metered_post()
    for piece in (request[:7], request[7:60], request[60:-10], request[-10:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.02)
    answer = (await answers.answers_until(1))[0]
    writer.close()
    assert answer.status == 200 and upstream.seen.body == CHAT


async def test_a_large_body_is_forwarded_whole(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    big = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"word " * 600_000 + b'"}]}'
    request = metered_post(big)
    head_size = request.index(b"\r\n\r\n") + 4
    for i in range(head_size):  # the head a byte at a time, then the 3 MB body as it comes
        writer.write(request[i : i + 1])
    writer.write(request[head_size:])
    answer = (await answers.answers_until(1))[0]
    assert answer.status == 200 and upstream.seen.body == big
    assert fast_path_of(proxy).connections  # served by the fast path, not handed over
    writer.close()


async def test_header_bytes_reach_the_upstream_unchanged(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    request = metered_post(extra="X-Team: caf\xe9\r\nX-LLMTally-Tag-Team: search\r\n")
    writer.write(request.replace("café".encode(), b"caf\xe9"))  # a raw latin-1 byte, as sent on the wire
    answer = (await answers.answers_until(1))[0]
    writer.close()
    assert answer.status == 200
    assert upstream.seen.headers["X-Team"].encode("utf-8", "surrogateescape") == b"caf\xe9"
    assert "X-LLMTally-Tag-Team" not in upstream.seen.headers
    assert (await first_record(proxy))["tags"] == {"team": "search"}

    # The same through aiohttp's handler (a chunked upload is handed over), with UTF-8 beyond latin-1.
    answers, writer = await connect(proxy)
    writer.write(chunked_post(extra="X-Team: caf\u00e9 \u20ac\r\n"))
    answer = (await answers.answers_until(1))[0]
    writer.close()
    assert answer.status == 200
    assert upstream.seen.headers["X-Team"].encode("utf-8", "surrogateescape") == "café €".encode()


async def test_chunked_uploads_and_100_continue_are_handed_to_aiohttp_and_metered(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    writer.write(chunked_post())
    answer = (await answers.answers_until(1))[0]
    writer.close()
    assert answer.status == 200 and upstream.seen.body == CHAT
    assert not fast_path_of(proxy).connections

    # Expect: 100-continue: the body is sent only after aiohttp's interim 100 answer.
    reader, writer = await asyncio.open_connection(*proxy.url.removeprefix("http://").split(":"))
    writer.write(metered_post(extra="Expect: 100-continue\r\n").removesuffix(CHAT))
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
    writer.write(CHAT)
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    records = await proxy.flush()
    assert [r["input_tokens"] for r in records] == [1200, 1200]


async def test_idle_keep_alive_connections_are_closed(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "KEEPALIVE_S", 0.2)  # aiohttp's 75 s default, shortened
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    writer.write(metered_post())
    assert (await answers.answers_until(1))[0].status == 200
    async with asyncio.timeout(5):
        assert await answers.reader.read() == b""  # closed by the proxy once idle
    writer.close()
    assert not fast_path_of(proxy).connections


async def test_bad_and_oversized_requests_get_aiohttps_errors(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = Config(server=ServerConfig(max_request_body_mb=1))
    proxy = await make_proxy(config)
    answers, writer = await connect(proxy)
    big = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * (1 << 20) + b'"}]}'
    writer.write(metered_post(big))
    too_big = (await answers.answers_until(1))[0]
    writer.close()
    assert too_big.status == 413 and upstream.requests == 0

    answers, writer = await connect(proxy)
    writer.write(b"POST /openai/v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    bad = (await answers.answers_until(1))[0]
    writer.close()
    assert bad.status == 400 and upstream.requests == 0


async def test_connection_close_is_honoured(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy()
    answers, writer = await connect(proxy)
    writer.write(metered_post(extra="Connection: close\r\n"))
    answer = (await answers.answers_until(1))[0]
    assert answer.status == 200 and answer.headers["connection"] == "close" and not answer.keep_alive
    async with asyncio.timeout(5):
        assert await answers.reader.read() == b""  # then the proxy closes its end
    writer.close()


async def test_a_slow_reader_holds_the_stream_back_not_the_proxys_memory() -> None:
    piece = b"data: " + b"x" * 65536 + b"\n\n"
    pieces = 200  # ~13 MB

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(pieces):
            await response.write(piece)
        await response.write_eof()
        return response

    runner, base = await serve_post("/v1/chat/completions", flood)
    proxy = await start_proxy(config_for_upstream(base, inject_stream_usage=False))
    fast = fast_path_of(proxy)
    try:
        answers, writer = await connect(proxy)
        writer.write(metered_post(STREAM_CHAT))
        buffered = []
        received = 0
        async with asyncio.timeout(30):
            while True:
                data = await answers.reader.read(16384)
                answers.parser.feed_data(data)
                received += len(data)
                buffered += [c.transport.get_write_buffer_size() for c in fast.connections if c.transport]
                if answers.answers and answers.answers[0].complete:
                    break
                await asyncio.sleep(0.001)  # a slow client
        writer.close()
        assert answers.answers[0].body == piece * pieces
        assert max(buffered) < 4 * 1024 * 1024  # bounded by flow control, not the 13 MB answer
        assert (await first_record(proxy))["status"] == 200
    finally:
        await proxy.stop()
        await runner.cleanup()


async def test_fast_path_off_leaves_every_request_to_aiohttp(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(Config(server=ServerConfig(fast_path=False)))
    assert not isinstance(proxy.runner.server, FastPathServer)
    answers, writer = await connect(proxy)
    writer.write(metered_post())
    answer = (await answers.answers_until(1))[0]
    writer.close()
    assert answer.status == 200
    assert (await first_record(proxy))["input_tokens"] == 1200


# Hostile heads: the same verdict with the fast path on and off (aiohttp's, or stricter) ----------


@pytest.fixture(params=[True, False], ids=["fast_path", "aiohttp_only"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _config(fast: bool, **server: object) -> Config:
    return Config(server=ServerConfig(fast_path=fast, **server))  # type: ignore[arg-type]


def _head(lines: bytes, body: bytes = CHAT, eol: bytes = b"\r\n") -> bytes:
    start = b"POST /openai/v1/chat/completions HTTP/1.1" + eol
    return start + lines.replace(b"\r\n", eol) + b"Content-Length: %d" % len(body) + eol + eol + body


_HOST = b"Host: proxy\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n"
_BAD_HEADS = {
    "a 70 KiB header": _head(_HOST + b"X-Big: " + b"a" * 70_000 + b"\r\n"),
    "a 9 KB header": _head(_HOST + b"X-Big: " + b"a" * 9_000 + b"\r\n"),
    "200 headers": _head(_HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(200))),
    "10,000 headers": _head(_HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))),
    "bare LF line ends": _head(_HOST, eol=b"\n"),
    "a head ending CRLF LF": _HOST.join(
        [b"POST /openai/v1/chat/completions HTTP/1.1\r\n", b"Content-Length: 2\r\n\n{}"]
    ),
    "no Host": _head(b"Authorization: Bearer k\r\n"),
    "two Hosts": _head(_HOST + b"Host: other\r\n"),
}


@pytest.mark.parametrize("request_bytes", list(_BAD_HEADS.values()), ids=list(_BAD_HEADS))
async def test_bad_heads_get_400_at_once_on_either_path(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    fast_path: bool,
    request_bytes: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(_config(fast_path))
    answer = await raw_exchange(proxy.url, request_bytes, timeout_s=3)
    assert status_of(answer) == 400, answer[:200]
    assert upstream.requests == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback per request


_HANDED_ON = {
    "h2c upgrade": _head(
        _HOST + b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAA\r\n"
    ),
    "websocket upgrade": _head(
        _HOST
        + b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
    ),
    "CONNECT": b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
    "an absolute-form target": _head(_HOST).replace(b"POST /openai", b"POST http://127.0.0.1:9/openai", 1),
    "a non-ASCII target": _head(_HOST).replace(b"/chat/completions", b"/chat/compl\xe9tions", 1),
}
_HANDED_ON_STATUS = {
    "h2c upgrade": 200, "websocket upgrade": 200, "CONNECT": 404, "an absolute-form target": 400,
    "a non-ASCII target": 400,
}  # fmt: skip


@pytest.mark.parametrize("case", list(_HANDED_ON))
async def test_upgrade_connect_and_odd_targets_are_answered_without_a_traceback(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    fast_path: bool,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(_config(fast_path))
    answer = await raw_exchange(proxy.url, _HANDED_ON[case], timeout_s=3)
    assert status_of(answer) == _HANDED_ON_STATUS[case], answer[:300]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    if _HANDED_ON_STATUS[case] == 200:  # served as a plain POST: the upgrade is hop-by-hop, not forwarded
        assert upstream.seen is not None and "upgrade" not in {k.lower() for k in upstream.seen.headers}
    else:
        assert upstream.requests == 0


@pytest.mark.parametrize(
    ("raw", "recorded"),
    [(b"caf\xe9\xff", "caf\u00e9\u00ff"), ("café ✓".encode(), "café ✓"), (b"plain", "plain")],
    ids=["not UTF-8: read as ISO-8859-1", "UTF-8", "ASCII"],
)
async def test_tag_bytes_are_recorded_as_text_that_renders(
    make_proxy: MakeProxy, upstream: FakeUpstream, fast_path: bool, raw: bytes, recorded: str
) -> None:
    proxy = await make_proxy(_config(fast_path))
    answer = await raw_exchange(proxy.url, _head(_HOST + b"x-llmtally-tag-team: " + raw + b"\r\n"))
    assert status_of(answer) == 200
    record = await first_record(proxy)
    assert record["tags"] == {"team": recorded}
    orjson.dumps(record, default=str)  # a record with surrogate escapes once stopped every sink
    assert upstream.seen is not None and all(
        not k.lower().startswith("x-llmtally") for k in upstream.seen.headers
    )


async def test_a_head_dribbled_in_is_cut_off_at_head_timeout(
    make_proxy: MakeProxy, upstream: FakeUpstream, fast_path: bool
) -> None:
    proxy = await make_proxy(_config(fast_path, head_timeout_s=0.5))
    request = _head(_HOST)
    pieces: list[bytes | float] = []
    for i in range(0, 60, 5):  # 5 bytes every 0.1 s: the whole head would take ~6 s
        pieces += [request[i : i + 5], 0.1]
    started = asyncio.get_running_loop().time()
    answer = await raw_exchange(proxy.url, pieces, timeout_s=5)
    assert status_of(answer) == 408, answer
    assert asyncio.get_running_loop().time() - started < 3
    assert upstream.requests == 0


@pytest.mark.parametrize(
    "path", ["/openai/v1/chat/completions", "/openai/echo/slow"], ids=["metered", "passthrough"]
)
async def test_a_body_slower_than_min_body_rate_is_cut_off(
    make_proxy: MakeProxy, upstream: FakeUpstream, fast_path: bool, path: str
) -> None:
    proxy = await make_proxy(_config(fast_path, body_grace_s=0.5, min_body_rate_bytes_s=1000))
    body = b"x" * 5000  # allowed 0.5 s + 5 s at 1000 B/s; sent at 50 B/s
    head = _head(_HOST, body=body)[: -len(body)].replace(b"/openai/v1/chat/completions", path.encode())
    pieces: list[bytes | float] = [head]
    for i in range(0, 500, 5):
        pieces += [body[i : i + 5], 0.1]
    answer = await raw_exchange(proxy.url, pieces, timeout_s=10)
    assert status_of(answer) == 408, answer[:300]


async def test_a_head_within_the_limits_is_served_on_the_fast_path(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy()
    fields = b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 500) for i in range(100))  # 50 KB, within every limit
    answer = await raw_exchange(proxy.url, _head(_HOST + fields))
    assert status_of(answer) == 200
    assert upstream.seen is not None and upstream.seen.headers["X-H99"] == "v" * 500
