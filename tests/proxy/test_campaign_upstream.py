"""The campaign, upstream: a misbehaving upstream behind the proxy, fast path on and off.

The upstream is a raw loopback server that sends exactly the bytes each case scripts, per
connection. Every case runs for a metered call (llmtally's own upstream client) and, where it
applies, a passthrough call (aiohttp's client), each through a proxy with ``fast_path`` on and
one with it off. The client always gets an answer or a clean close within seconds; an upstream
failure before any byte went to the client is a 502/504; a connection that carried bytes nobody
asked for is never used again (the next call, from another client, gets its own answer); every
metered call leaves a record saying what happened, and nothing logs a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmtally.testing.harness import RunningProxy
from tests.proxy.campaign_helpers import (
    STREAM_CHAT,
    Script,
    UpstreamConn,
    Verdict,
    assert_no_tracebacks,
    chat_completion,
    exchange,
    http_response,
    one_proxy,
    port_of,
    post,
    raw_upstream,
    respond_with,
)

KEY = "sk-campaign-upstream-0123456789"
METERED = post(extra=f"Authorization: Bearer {KEY}\r\n")
STREAMED = post(body=STREAM_CHAT, extra=f"Authorization: Bearer {KEY}\r\n")
PASSTHROUGH = f"GET /openai/v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
REQUESTS = {"metered": METERED, "passthrough": PASSTHROUGH, "stream": STREAMED}

FIRST = http_response(chat_completion("first"))
SECOND = http_response(chat_completion("second"))
#: What a connection that should never have been reused answers.
REUSED = http_response(chat_completion("reused"))
UNSOLICITED = http_response(chat_completion("unsolicited"))

#: What only a connection's leftovers, or a reused connection, could put in an answer.
LEFTOVERS = (b"chatcmpl-reused", b"chatcmpl-unsolicited", b"JUNK")
#: Longer than the proxies' read_timeout_s (1 s): a stall the proxy must end.
STALL_S = 2.5


# Scripts -----------------------------------------------------------------------------------------


def then_reused(first: bytes, later_s: float = 0.0, later: bytes = b"") -> Script:
    """Answer the first request with ``first`` (and ``later`` after ``later_s``), and any request
    after it with :data:`REUSED`: the connection should not have been used again."""

    async def script(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(first)
        if later:
            await asyncio.sleep(later_s)
            await conn.send(later)
        while True:
            await conn.read_request()
            await conn.send(REUSED)

    return script


def answer_then(data: bytes, end: str = "close", after_s: float = 0.0) -> Script:
    """Read one request, send ``data``, then ``close``, ``reset`` or ``stall`` (keep it open, silent)."""

    async def script(conn: UpstreamConn) -> None:
        await conn.read_request()
        if data:
            await conn.send(data)
        await asyncio.sleep(after_s)
        if end == "reset":
            conn.reset()
        elif end == "stall":
            await asyncio.sleep(STALL_S * 4)

    return script


async def closes_idle(conn: UpstreamConn) -> None:
    """Answer one request (keep-alive), then close the idle connection soon after."""
    await conn.read_request()
    await conn.send(FIRST)
    await asyncio.sleep(0.02)


async def closes_on_reuse(conn: UpstreamConn) -> None:
    """Answer one request (keep-alive); close as the next one arrives, unanswered."""
    await conn.read_request()
    await conn.send(FIRST)
    await conn.read_request()


def chunked(*chunks: bytes, head: str = "Content-Type: application/json\r\n", end: bool = True) -> bytes:
    """A chunked 200 answer; ``end=False``: without its last chunk (more would follow)."""
    body = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks)
    last = b"0\r\n\r\n" if end else b""
    return f"HTTP/1.1 200 OK\r\n{head}Transfer-Encoding: chunked\r\n\r\n".encode() + body + last


def with_usage(usage: str) -> bytes:
    return http_response(chat_completion("first", usage))


def sse(*events: bytes, end: bool = True) -> bytes:
    return chunked(*events, head="Content-Type: text/event-stream\r\n", end=end)


GZIPPED = gzip.compress(chat_completion("first"))
DEFLATED = zlib.compress(chat_completion("first"))
#: Not real brotli: llmtally cannot decode br, so the client must get these bytes as they are.
BROTLI = b"\x1b\x4a\x00\xf8\x8d\xd4\x6e\x55not-really-brotli"
STREAM_EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
)
USAGE_EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
)


# Cases -------------------------------------------------------------------------------------------

ANY: Any = object()


@dataclass(frozen=True)
class Fault:
    id: str
    #: Per upstream connection (the last repeats); none: nothing listens (connection refused).
    scripts: tuple[Script, ...]
    #: Verdicts the client may get (see :attr:`Verdict.summary`).
    accepted: tuple[tuple[str, ...], ...]
    routes: tuple[str, ...] = ("metered", "passthrough")
    #: The exact status, and the exact body, the client must get (None: not checked).
    status: int | None = None
    body: bytes | None = None
    #: Headers (lower-case name, value) the client must get.
    headers: tuple[tuple[str, str], ...] = ()
    #: What the metered call's record must say: its status, and a text its error holds ("": no
    #: error; ANY: not checked).
    record_status: Any = ANY
    record_error: Any = ANY
    #: (input_tokens, output_tokens) the record must hold.
    usage: tuple[int, int] | None = None
    #: Checks on the record beyond these.
    record_check: Callable[[dict[str, Any]], None] | None = None
    #: Calls other clients make on the same proxy afterwards: each gets its own answer (a 2xx
    #: carrying "second", or one of ``follow_up_accepted``), and the last one a 2xx.
    follow_ups: int = 0
    follow_up_accepted: tuple[tuple[str, ...], ...] = (("2xx",),)
    #: The first upstream connection served exactly one request: it was never used again.
    never_reused: bool = False
    #: Extra request header lines (Accept-Encoding).
    client_headers: str = ""


def usage_flagged(record: dict[str, Any]) -> None:
    """Absurd usage is not taken as it came: the record says so, and holds no absurd count."""
    note = f"{record.get('error') or ''} {record.get('pricing_note') or ''}".lower()
    assert "usage" in note, record
    for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
        value = record[name]
        assert isinstance(value, int) and 0 <= value < 2**63, (name, value)


def undecodable_said(record: dict[str, Any]) -> None:
    """A body that is not valid in its Content-Encoding is not metered, and the record says why."""
    assert "not valid gzip" in (record.get("error") or ""), record


FIVE = (("5xx",),)
#: The upstream failed before its head: 502/504, or (a passthrough GET, which aiohttp's client may
#: retry on a new connection) the retried call's answer.
FIVE_OR_RETRIED = (("5xx",), ("2xx",))
#: Bytes after a complete response in the same read: that response, or a 502 (the read was bad).
OK_OR_502 = (("2xx",), ("5xx",))
#: A failure after the head went out: the client sees the answer cut short (or, had the proxy
#: held the head back, a 5xx).
CUT = (("cut",), ("5xx",))
OK = (("2xx",),)
M = ("metered",)
S = ("stream",)
ERR_502 = "upstream_unreachable"
ERR_504 = "upstream_timeout"
#: The upstream answered, but not in HTTP/1.1.
ERR_PROTO = "upstream_protocol_error"
BIG_HEADER = "X-Big: " + "a" * (1 << 20) + "\r\n"
MANY_HEADERS = "".join(f"X-H{i}: v\r\n" for i in range(5000))

FAULTS = [
    Fault("connection-refused", (), FIVE, status=502, record_status=502, record_error=ERR_502),
    Fault("reset-before-head", (answer_then(b"", "reset"),), FIVE_OR_RETRIED, status=502, record_status=502, record_error=ERR_502, follow_ups=1),
    Fault("close-before-head", (answer_then(b""),), FIVE_OR_RETRIED, status=502, record_status=502, record_error=ERR_502, follow_ups=1),
    Fault("reset-mid-head", (answer_then(b"HTTP/1.1 200 OK\r\nContent-Ty", "reset"),), FIVE_OR_RETRIED, status=502, record_status=502, record_error=ERR_502, follow_ups=1),
    Fault("close-mid-head", (answer_then(b"HTTP/1.1 200 OK\r\nContent-Ty"),), FIVE_OR_RETRIED, status=502, record_status=502, record_error=ERR_502, follow_ups=1),
    Fault("reset-mid-body", (answer_then(FIRST[:-40], "reset", 0.05),), CUT, record_error="upstream_unreachable", follow_ups=1),
    Fault("close-mid-body", (answer_then(FIRST[:-40], "close", 0.05),), CUT, record_error="upstream_unreachable", follow_ups=1),
    Fault("stall-before-head", (answer_then(b"", "stall"),), FIVE, status=504, record_status=504, record_error=ERR_504, follow_ups=1),
    Fault("stall-mid-head", (answer_then(b"HTTP/1.1 200 OK\r\n", "stall"),), FIVE, status=504, record_status=504, record_error=ERR_504, follow_ups=1),
    Fault("stall-between-chunks", (answer_then(chunked(b'{"id":', end=False), "stall"),), CUT, record_error=ERR_504, follow_ups=1),
    Fault("stall-mid-body", (answer_then(FIRST[:-40], "stall"),), CUT, record_error=ERR_504, follow_ups=1),
    Fault("pooled-connection-closed-while-idle", (closes_idle, respond_with(SECOND)), OK, body=chat_completion("first"), follow_ups=1),
    # A POST is not retried (RFC 9112 9.3.1): the call the closing connection took may fail.
    Fault("pooled-connection-closes-on-reuse", (closes_on_reuse, respond_with(SECOND)), OK, follow_ups=2, follow_up_accepted=(("2xx",), ("5xx",))),
    Fault("status-429-forwarded", (respond_with(http_response(b'{"error":{"type":"rate_limit"}}', "429 Too Many Requests", "Retry-After: 7\r\n")),), (("4xx",),), status=429, body=b'{"error":{"type":"rate_limit"}}', headers=(("retry-after", "7"),), record_status=429),
    Fault("status-400-forwarded", (respond_with(http_response(b'{"error":"bad"}', "400 Bad Request")),), (("4xx",),), status=400, body=b'{"error":"bad"}', record_status=400),
    Fault("status-500-forwarded", (respond_with(http_response(b'{"error":"boom"}', "500 Internal Server Error")),), FIVE, status=500, body=b'{"error":"boom"}', record_status=500),
    Fault("status-503-chunked-forwarded", (respond_with(chunked(b'{"error":', b'"overloaded"}').replace(b"200 OK", b"503 Service Unavailable")),), FIVE, status=503, body=b'{"error":"overloaded"}', record_status=503),
    Fault("content-length-shorter", (then_reused(FIRST.replace(b"Content-Length: 224", b"Content-Length: 100")), respond_with(SECOND)), OK_OR_502, body=chat_completion("first")[:100], follow_ups=1, never_reused=True),
    Fault("content-length-longer-then-close", (answer_then(FIRST.replace(b"Content-Length: 224", b"Content-Length: 400"), "close", 0.05), respond_with(SECOND)), CUT, record_error="upstream_unreachable", follow_ups=1),
    Fault("content-length-longer-then-stall", (answer_then(FIRST.replace(b"Content-Length: 224", b"Content-Length: 400"), "stall"), respond_with(SECOND)), CUT, record_error="upstream_timeout", follow_ups=1),
    Fault("unsolicited-second-response", (then_reused(FIRST + UNSOLICITED), respond_with(SECOND)), OK_OR_502, body=chat_completion("first"), follow_ups=1, never_reused=True),
    Fault("partial-head-after-response", (then_reused(FIRST + b"HTTP/1.1 200 OK\r\nContent-Le"), respond_with(SECOND)), OK_OR_502, body=chat_completion("first"), follow_ups=1, never_reused=True),
    Fault("junk-after-body-same-read", (then_reused(FIRST + b"JUNKJUNKJUNK"), respond_with(SECOND)), OK_OR_502, body=chat_completion("first"), follow_ups=1, never_reused=True),
    Fault("junk-after-body-later", (then_reused(FIRST, 0.05, b"JUNKJUNKJUNK"), respond_with(SECOND)), OK, body=chat_completion("first"), follow_ups=1, never_reused=True),
    Fault("unsolicited-response-later", (then_reused(FIRST, 0.05, UNSOLICITED), respond_with(SECOND)), OK, body=chat_completion("first"), follow_ups=1, never_reused=True),
    Fault("chunked-then-invalid-size", (then_reused(chunked(b'{"id":', end=False) + b"zz\r\n"), respond_with(SECOND)), CUT, record_error="upstream", follow_ups=1, never_reused=True),
    Fault("chunked-invalid-size-first", (then_reused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"), respond_with(SECOND)), CUT, record_error="upstream", follow_ups=1, never_reused=True),
    Fault("chunked-overflowing-size", (then_reused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc"), respond_with(SECOND)), CUT, record_error="upstream", follow_ups=1, never_reused=True),
    Fault("switching-protocols-to-post", (then_reused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"), respond_with(SECOND)), (*FIVE, ("closed",)), routes=M, record_status=ANY, follow_ups=1, never_reused=True),
    Fault("status-line-garbage", (then_reused(b"HTTP/1.1 2OO OK\r\n\r\n"), respond_with(SECOND)), FIVE, status=502, record_status=502, record_error=ERR_PROTO, follow_ups=1, never_reused=True),
    Fault("not-http-at-all", (then_reused(b"SSH-2.0-OpenSSH_9.6\r\n"), respond_with(SECOND)), FIVE, status=502, record_status=502, follow_ups=1, never_reused=True),
    Fault("header-of-1-mib", (then_reused(http_response(chat_completion(), headers=BIG_HEADER)), respond_with(SECOND)), FIVE, status=502, record_status=502, follow_ups=1, never_reused=True),
    Fault("thousands-of-headers", (then_reused(http_response(chat_completion(), headers=MANY_HEADERS)), respond_with(SECOND)), FIVE, status=502, record_status=502, follow_ups=1, never_reused=True),
    Fault("gzip-body", (respond_with(http_response(GZIPPED, headers="Content-Encoding: gzip\r\n")),), OK, body=GZIPPED, headers=(("content-encoding", "gzip"),), record_status=200, record_error="", usage=(7, 3), client_headers="Accept-Encoding: gzip\r\n"),
    Fault("deflate-body", (respond_with(http_response(DEFLATED, headers="Content-Encoding: deflate\r\n")),), OK, body=DEFLATED, headers=(("content-encoding", "deflate"),), record_status=200, record_error="", usage=(7, 3), client_headers="Accept-Encoding: deflate\r\n"),
    Fault("br-body-undecodable", (respond_with(http_response(BROTLI, headers="Content-Encoding: br\r\n")),), OK, body=BROTLI, headers=(("content-encoding", "br"),), record_status=200, client_headers="Accept-Encoding: br\r\n"),
    Fault("gzip-body-corrupt", (respond_with(http_response(GZIPPED[:20] + b"\x00" * 20 + GZIPPED[40:], headers="Content-Encoding: gzip\r\n")),), OK, body=GZIPPED[:20] + b"\x00" * 20 + GZIPPED[40:], record_status=200, client_headers="Accept-Encoding: gzip\r\n", record_check=undecodable_said),
    Fault("gzip-chunked", (respond_with(chunked(GZIPPED[:30], GZIPPED[30:], head="Content-Type: application/json\r\nContent-Encoding: gzip\r\n")),), OK, body=GZIPPED, record_status=200, record_error="", usage=(7, 3), client_headers="Accept-Encoding: gzip\r\n"),
    Fault("sse-garbage-events", (respond_with(sse(STREAM_EVENT, b"data: {not json\n\n", b"event: x\ndata: \xff\xfe\x00\n\n", b": comment\n\ndata:\n\n", USAGE_EVENT, b"data: [DONE]\n\n")),), OK, routes=S, record_status=200, usage=(7, 3)),
    Fault("sse-truncated-then-close", (answer_then(sse(STREAM_EVENT, end=False) + b"30\r\ndata: {\"id\":\"c1\",\"choi", "close", 0.05),), CUT, routes=S, record_status=200, record_error="upstream_unreachable", follow_ups=1),
    Fault("sse-without-framing-until-close", (answer_then(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + STREAM_EVENT + USAGE_EVENT + b"data: {trunc", "close", 0.05),), (*OK, ("cut",)), routes=S, record_status=200, follow_ups=1),
    Fault("sse-lines-of-1-mib", (respond_with(sse(b"data: " + b"x" * (1 << 20) + b"\n\n", USAGE_EVENT, b"data: [DONE]\n\n")),), OK, routes=S, record_status=200, usage=(7, 3)),
    Fault("usage-10e30", (respond_with(with_usage('{"prompt_tokens":1000000000000000000000000000000,"completion_tokens":3}')),), OK, routes=M, body=chat_completion("first", '{"prompt_tokens":1000000000000000000000000000000,"completion_tokens":3}'), record_status=200, record_check=usage_flagged),
    Fault("usage-2e64", (respond_with(with_usage('{"prompt_tokens":36893488147419103232,"completion_tokens":3}')),), OK, routes=M, record_status=200, record_check=usage_flagged),
    Fault("usage-negative", (respond_with(with_usage('{"prompt_tokens":-5,"completion_tokens":-3}')),), OK, routes=M, record_status=200, record_check=usage_flagged),
    Fault("usage-fractional", (respond_with(with_usage('{"prompt_tokens":1.5,"completion_tokens":3}')),), OK, routes=M, record_status=200, record_check=usage_flagged),
    Fault("usage-strings", (respond_with(with_usage('{"prompt_tokens":"7","completion_tokens":[3]}')),), OK, routes=M, record_status=200, record_check=usage_flagged),
    Fault("usage-1e400", (respond_with(with_usage('{"prompt_tokens":1e400,"completion_tokens":3}')),), OK, routes=M, record_status=200),
    Fault("usage-in-stream-10e30", (respond_with(sse(STREAM_EVENT, USAGE_EVENT.replace(b'"prompt_tokens":7', b'"prompt_tokens":1000000000000000000000000000000'), b"data: [DONE]\n\n")),), OK, routes=S, record_status=200, record_check=usage_flagged),
]  # fmt: skip

CASES = [pytest.param(fault, route, id=f"{fault.id}-{route}") for fault in FAULTS for route in fault.routes]


@dataclass
class Outcome:
    verdict: Verdict
    follow_ups: list[Verdict]
    records: list[dict[str, Any]]
    first_conn_requests: int | None
    notes: list[str] = field(default_factory=list)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _records(proxy: RunningProxy, count: int) -> list[dict[str, Any]]:
    """The records of ``count`` calls (a cut-off call's comes a little later)."""
    for _ in range(30):
        records = await proxy.flush()
        if len(records) >= count:
            break
        await asyncio.sleep(0.1)
    return list(proxy.records)


async def run_fault(fault: Fault, route: str, fast_path: bool) -> Outcome:
    request = REQUESTS[route]
    if fault.client_headers:
        request = request.replace(b"\r\n\r\n", b"\r\n" + fault.client_headers.encode() + b"\r\n", 1)
    scripts = fault.scripts or (respond_with(SECOND),)
    if fault.follow_ups and len(scripts) == 1:
        scripts = (*scripts, respond_with(SECOND))  # later connections answer well
    async with raw_upstream(*scripts) as upstream:
        base = upstream.url if fault.scripts else f"http://127.0.0.1:{_closed_port()}"
        async with one_proxy(base, fast_path) as proxy:
            port = port_of(proxy.url)
            verdict = await exchange(port, [request])
            follow_ups = []
            for _ in range(fault.follow_ups):
                await asyncio.sleep(0.1)  # the first call's connection is settled (pooled or closed)
                follow_ups.append(await exchange(port, [request]))
            metered = route != "passthrough"
            records = await _records(proxy, 1 + fault.follow_ups) if metered else []
            first = len(upstream.conns[0].requests) if upstream.conns else None
            return Outcome(verdict, follow_ups, records, first)


def _header(verdict: Verdict, name: str) -> str | None:
    return verdict.answers[0].headers.get(name) if verdict.answers else None


@pytest.mark.parametrize(("fault", "route"), CASES)
async def test_upstream_fault(fault: Fault, route: str, caplog: pytest.LogCaptureFixture) -> None:
    outcomes = await asyncio.gather(run_fault(fault, route, True), run_fault(fault, route, False))
    for name, outcome in zip(("fast path", "aiohttp"), outcomes, strict=True):
        verdict = outcome.verdict
        shown = verdict.raw[:400]
        assert verdict.garbled is None, f"{name}: {verdict.garbled}: {shown!r}"
        assert verdict.summary in fault.accepted, f"{name}: {verdict.summary} {shown!r}"
        for answer in verdict.answers:  # never bytes of another exchange, nor a connection's leftovers
            assert not any(m in answer.body for m in LEFTOVERS), f"{name}: {shown!r}"
        if verdict.summary == fault.accepted[0]:  # the answer it should be: exactly that
            if fault.status is not None:
                assert verdict.statuses[:1] == [fault.status], f"{name}: {shown!r}"
            if fault.body is not None:
                assert verdict.answers[0].body == fault.body, f"{name}: {shown!r}"
            for header, value in fault.headers:
                assert _header(verdict, header) == value, f"{name}: {header} {shown!r}"
        for i, later in enumerate(outcome.follow_ups):
            last = i == len(outcome.follow_ups) - 1
            allowed = (("2xx",),) if last else fault.follow_up_accepted
            assert later.summary in allowed, f"{name}: follow-up {i}: {later.summary} {later.raw[:400]!r}"
            if later.summary == ("2xx",):
                # Its own answer: never the first exchange's bytes, nor a connection's leftovers.
                assert later.answers[0].body == chat_completion("second"), f"{name}: {later.raw[:400]!r}"
        if fault.never_reused:
            assert outcome.first_conn_requests == 1, f"{name}: the connection with leftover bytes was reused"
        if route != "passthrough":
            assert len(outcome.records) == 1 + fault.follow_ups, (name, outcome.records)
            record = outcome.records[0]
            if fault.record_status is not ANY:
                assert record["status"] == fault.record_status, (name, record)
            if fault.record_error == "":
                assert record["error"] is None, (name, record)
            elif fault.record_error is not ANY:
                assert fault.record_error in (record["error"] or ""), (name, record)
            if fault.usage is not None:
                assert (record["input_tokens"], record["output_tokens"]) == fault.usage, (name, record)
            if fault.record_check is not None:
                fault.record_check(record)
            if fault.follow_ups:  # the call that got its own answer was metered as such
                assert any(r["status"] == 200 and r["error"] is None for r in outcome.records[1:]), name
    assert outcomes[0].verdict.summary == outcomes[1].verdict.summary
    assert_no_tracebacks(caplog)
