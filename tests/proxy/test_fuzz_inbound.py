"""Fuzzing the inbound parser (issue 26): raw request bytes, cut anywhere, sent over loopback to the
running proxy (fast path on and off) in front of a raw upstream.

- Any bytes: every connection gets answers (valid HTTP/1.1, never a 500) or a clean close within a
  bound, and nothing is logged at ERROR or with a traceback.
- Valid metered calls, cut at any points and pipelined: the upstream receives exactly the body bytes
  each client sent, and each client gets its answer.

One proxy and one upstream serve a whole test (starting them per example would cost more than the
examples): a private event loop runs them, and each example runs its exchange on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llmtally.config import Config
from llmtally.testing.harness import RunningProxy, start_proxy
from tests.providers.test_streams import cut
from tests.proxy.campaign_helpers import (
    RawUpstream,
    Reading,
    UpstreamConn,
    campaign_config,
    chat_completion,
    http_response,
    port_of,
    read_answers,
)
from tests.proxy.test_fastpath import Answer
from tests.proxy.test_fastpath import _Reader as AnswerReader

T = TypeVar("T")

#: The longest one example's exchange may take before it counts as a hang: above the proxy's head
#: and body deadlines here (HEAD_TIMEOUT_S, BODY_GRACE_S), far below anything a client would wait.
HANG_S = 3.0
HEAD_TIMEOUT_S = 0.5
BODY_GRACE_S = 0.5


def examples(share: float, **more: Any) -> settings:
    """``share`` of the profile's example count (tests/conftest.py): socket examples cost ~10 ms each."""
    return settings(max_examples=max(5, int(settings.default.max_examples * share)), **more)


class Logged(logging.Handler):
    """Every record logged at ERROR or with a traceback while a rig runs (how llmtally and asyncio report
    their own failures)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.bad.append(f"{record.name} {record.levelname}: {record.getMessage()}")


@dataclass
class Rig:
    """A proxy in front of a raw upstream, on a loop of its own."""

    loop: asyncio.AbstractEventLoop
    port: int
    upstream: RawUpstream
    logged: Logged
    proxy: RunningProxy
    #: What the upstream answers next (the upstream fuzz sets it per example).
    answer: list[bytes | float] = field(default_factory=list)
    close_after: bool = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one example's exchange; fail it if anything was logged as a failure meanwhile."""
        result = self.loop.run_until_complete(coro)
        # Let what the exchange set off (records, closes) finish before the logs are judged.
        self.loop.run_until_complete(asyncio.sleep(0.005))
        bad, self.logged.bad = self.logged.bad, []
        assert not bad, bad
        return result


def scripted_answer(rig_of: list[Rig]) -> Any:
    """The upstream's script: answer each request with the rig's current ``answer`` pieces."""

    async def script(conn: UpstreamConn) -> None:
        while True:
            await conn.read_request()
            rig = rig_of[0]
            for piece in rig.answer:
                if isinstance(piece, float):
                    await asyncio.sleep(piece)
                else:
                    await conn.send(piece)
            if rig.close_after:
                return

    return script


def fuzz_config(base_url: str, fast_path: bool, **upstreams: float | int) -> Config:
    """The campaign's small limits, and head and body deadlines short enough for an example to end
    fast when its bytes are a request cut short."""
    config = campaign_config(base_url, fast_path, **upstreams)
    server = dataclasses.replace(config.server, head_timeout_s=HEAD_TIMEOUT_S, body_grace_s=BODY_GRACE_S)
    return dataclasses.replace(config, server=server)


@contextlib.contextmanager
def running_rig(fast_path: bool, **upstreams: float | int) -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    logged = Logged()
    logging.getLogger().addHandler(logged)
    stack = contextlib.AsyncExitStack()
    holder: list[Rig] = []
    upstream = RawUpstream([scripted_answer(holder)])
    try:
        loop.run_until_complete(upstream.start())
        stack.push_async_callback(upstream.stop)
        proxy = loop.run_until_complete(start_proxy(fuzz_config(upstream.url, fast_path, **upstreams)))
        stack.push_async_callback(proxy.stop)
        rig = Rig(loop, port_of(proxy.url), upstream, logged, proxy, [http_response(chat_completion())])
        holder.append(rig)
        yield rig
    finally:
        loop.run_until_complete(stack.aclose())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        logging.getLogger().removeHandler(logged)


@pytest.fixture(scope="module", params=[True, False], ids=["fast", "aiohttp"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    with running_rig(request.param) as rig:
        yield rig


# One raw client exchange ------------------------------------------------------------------------


@dataclass
class Seen:
    answers: list[Answer]
    closed: bool
    raw: bytes
    garbled: str | None


async def send_and_read(
    port: int, pieces: list[bytes | float], eof: bool, answers: int | None = None, quiet_s: float = 0.05
) -> Seen:
    """Send ``pieces`` (bytes, and float pauses) on a new connection, then half-close if ``eof``; read
    until the proxy closes, or until ``answers`` answers are complete and it stays quiet for
    ``quiet_s``. No end within HANG_S fails the example."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parser = AnswerReader(reader)
    reading = Reading()

    async def send() -> None:
        # OSError: the proxy may have closed before the half-close (ENOTCONN), as it may after a 400.
        with contextlib.suppress(OSError):
            for piece in pieces:
                if isinstance(piece, float):
                    await asyncio.sleep(piece)
                elif not writer.is_closing():
                    writer.write(piece)
                    await writer.drain()
            if eof and not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(send())

    def finished() -> bool:
        return answers is not None and sum(a.complete for a in parser.answers) >= answers and sender.done()

    try:
        async with asyncio.timeout(HANG_S):
            await read_answers(reader, parser, finished, quiet_s, reading)
    except TimeoutError:
        pytest.fail(f"no end within {HANG_S} s (a hang); got {bytes(reading.raw[:300])!r}")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
    return Seen(parser.answers, reading.closed, bytes(reading.raw), reading.garbled)


def pieces_of(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points``, without empty pieces (each is one write)."""
    return [piece for piece in cut(data, points) if piece]


def with_pauses(pieces: list[bytes], pause: float) -> list[bytes | float]:
    """The pieces with a pause between them, so the proxy reads each one apart."""
    out: list[bytes | float] = []
    for i, piece in enumerate(pieces):
        if i and pause:
            out.append(pause)
        out.append(piece)
    return out


SPLITS = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=8)
PAUSES = st.sampled_from([0.0, 0.0, 0.001, 0.003])


# Request heads of every shape --------------------------------------------------------------------

METHODS = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "CONNECT", "OPTIONS", "P\x00ST", "", "post"])
TARGETS = st.sampled_from(
    [
        "/openai/v1/chat/completions", "/anthropic/v1/messages", "/openai/v1/embeddings",
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "/openai/v1/models", "/healthz", "/metrics", "/", "*", "http://evil/openai/v1/chat/completions",
        "/openai/" + ".." + "/" + ".." + "/etc", "/%6fpenai/v1/chat/completions", "/openai/v1/chat/completions#x",
        "/openai/v1/chat/completions?a=%zz", "/anthropic/v1/messages\x7f", "/caf\xe9",
    ]
)  # fmt: skip
VERSIONS = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "HTTP/9", "", "http/1.1"]
)
HEADER_NAMES = st.sampled_from(
    [
        "Host", "Content-Length", "Content-Type", "Transfer-Encoding", "Expect", "Upgrade", "Connection",
        "Authorization", "x-llmtally-tag-team", "Accept-Encoding", "Content-Encoding", " Host",
        "Content-Length ", "X-Junk", "",
    ]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "proxy", "0", "5", "64", "-1", "1e3", "99999999999999999999", "chunked", "gzip, chunked",
            "100-continue", "h2c", "websocket", "close", "keep-alive", "Bearer sk-test", "application/json",
            "caf\xe9\xff", "a\rb", "a\nb", "",
        ]
    ),
    st.text(max_size=12),
)  # fmt: skip
EOL = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r"])


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """A request built from parts that may each be wrong, or plain random bytes; sometimes several."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 2)) == 0:  # a valid metered call, so the junk meets calls in flight
            out += request_bytes(draw(ROUTES), draw(BODIES), "h")
            continue
        eol = draw(EOL)
        headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
        body = draw(st.binary(max_size=80))
        if draw(st.booleans()):  # mostly a correct length, so the body matters
            headers.append(("Content-Length", str(len(body))))
        if draw(st.booleans()):
            headers.insert(0, ("Host", "proxy"))
        head = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}{eol}"
        head += "".join(f"{name}: {value}{eol}" for name, value in headers) + eol
        out += head.encode("utf-8", "surrogateescape") + body
    flips = draw(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=3))
    data = bytearray(out)
    for at, byte in flips:
        data[at % len(data)] = byte
    return bytes(data)


@examples(0.4)
@given(hostile_requests(), SPLITS, PAUSES, st.booleans())
def test_any_request_bytes_get_answers_or_a_clean_close(
    rig: Rig, data: bytes, points: list[int], pause: float, eof: bool
) -> None:
    # A connection that sends nothing may idle until the keep-alive timeout (75 s): that is no hang.
    eof = eof or not data
    # Without a half-close, the first answer (and a quiet spell) or a close ends the exchange.
    seen = rig.run(
        send_and_read(rig.port, with_pauses(pieces_of(data, points), pause), eof, answers=None if eof else 1)
    )
    assert seen.garbled is None, (seen.garbled, seen.raw[:400])
    statuses = [a.status for a in seen.answers if a.status]
    event(f"answered {sorted(set(statuses)) or 'nothing'}, {'closed' if seen.closed else 'kept open'}")
    assert 500 not in statuses, seen.raw[:400]  # llmtally's own failure
    assert seen.closed or seen.answers, seen.raw[:400]


# Valid metered calls: the upstream gets the exact bytes ------------------------------------------

ROUTES = st.sampled_from(
    [
        "/openai/v1/chat/completions",
        "/openai/v1/embeddings",
        "/anthropic/v1/messages",
        "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    ]
)
JSON_BODIES = st.builds(
    lambda model, text, n: (
        f'{{"model":"{model}","max_tokens":{n},"messages":[{{"role":"user","content":{text}}}]}}'.encode()
    ),
    st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "x"]),
    st.text(max_size=40).map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.integers(0, 1 << 40),
)
#: A body llmtally forwards as it came: any bytes, or JSON that asks for no stream (an OpenAI stream
#: request is edited on purpose: stream_options.include_usage, tests/providers/test_openai_stream_edit.py).
BODIES = st.one_of(st.binary(max_size=2000), JSON_BODIES)


def request_bytes(route: str, body: bytes, tag: str) -> bytes:
    return (
        f"POST {route} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        f"x-llmtally-tag-fuzz: {tag}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def body_of(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding" not in head.lower(), head
    return body


@examples(0.4)
@given(st.lists(st.tuples(ROUTES, BODIES), min_size=1, max_size=3), SPLITS, PAUSES)
def test_valid_calls_cut_anywhere_reach_the_upstream_byte_for_byte(
    rig: Rig, calls: list[tuple[str, bytes]], points: list[int], pause: float
) -> None:
    rig.answer, rig.close_after = [http_response(chat_completion())], False
    before = len(rig.upstream.requests)
    data = b"".join(request_bytes(route, body, str(i)) for i, (route, body) in enumerate(calls))
    seen = rig.run(
        send_and_read(rig.port, with_pauses(pieces_of(data, points), pause), False, answers=len(calls))
    )
    assert [(a.status, a.body) for a in seen.answers] == [(200, chat_completion())] * len(calls), seen.raw[
        :400
    ]
    sent = [body_of(request) for request in rig.upstream.requests[before:]]
    assert sent == [body for _, body in calls]
