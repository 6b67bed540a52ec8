"""The campaign, inbound: hostile request bytes on the proxy port, fast path on and off.

Each case is sent as raw bytes to two proxies, one with ``[server] fast_path = true`` and one with
``false`` (aiohttp serves everything), each with its own scripted upstream. Both must give the same
verdict (status classes, or a close), and that verdict is aiohttp's as written in the case (or
stricter where aiohttp's own is unsafe: absolute-form targets, missing or repeated Host). Nothing may
reach the upstream outside its configured base path, nothing may reach "any other host" (a second
loopback listener the tricks aim at), every case ends within seconds, and nothing logs a traceback.
"""

from __future__ import annotations

import asyncio
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote

import pytest

from llmtally.proxy.fastpath import FastPathServer
from tests.proxy.campaign_helpers import (
    CHAT,
    CHAT_PATH,
    Verdict,
    assert_no_tracebacks,
    chat_completion,
    counting_listener,
    exchange,
    http_response,
    one_proxy,
    port_of,
    post,
    raw_upstream,
    respond_with,
)

#: The upstream's configured base path: every request it gets must stay under it.
BASE = "/base"
#: Stands for the port of "any other host" in a case's bytes (replaced by the counting listener's).
OTHER = "OTHERPORT"
#: A second request hidden in a body: the upstream must never see it.
SMUGGLED = b"GET /openai/v1/SMUGGLED HTTP/1.1\r\nHost: proxy\r\n\r\n"
OK = http_response(chat_completion())
#: Upgrade and CONNECT may also be refused by closing the connection (nothing of them is served).
CLEAN_CLOSE = (("closed",),)
#: A target with dot segments may be forwarded if what the upstream resolves stays in its base.
FORWARDED_INSIDE = (("2xx",),)


@dataclass(frozen=True)
class Case:
    id: str
    writes: tuple[bytes, ...]
    #: The verdict both front ends must give (see :attr:`Verdict.summary`): aiohttp's, or stricter.
    expect: tuple[str, ...]
    answers: int = 1
    pause_s: float = 0.0
    #: Other verdicts as good as ``expect``: for bytes whose verdict depends on how reads split them
    #: (aiohttp refuses a whole read that ends in garbage, answers a read that holds only the good
    #: request), for Upgrade (a clean close), and for dot segments (refused, or forwarded resolved
    #: inside the upstream's base path).
    also: tuple[tuple[str, ...], ...] = ()
    #: The two front ends may give different ones of the accepted verdicts.
    may_differ: bool = False

    @classmethod
    def of(
        cls,
        id: str,
        data: bytes,
        *expect: str,
        answers: int = 1,
        also: tuple[tuple[str, ...], ...] = (),
        may_differ: bool = False,
    ) -> Case:
        return cls(id, (data,), expect, answers, also=also, may_differ=may_differ)

    @property
    def accepted(self) -> tuple[tuple[str, ...], ...]:
        return (self.expect, *self.also)


def head(*lines: str, request_line: str = f"POST {CHAT_PATH} HTTP/1.1", end: str = "\r\n") -> bytes:
    """A request head from its header lines (CRLF unless ``end`` says otherwise)."""
    return (end.join((request_line, *lines)) + end + end).encode("latin-1")


CHUNKED_CHAT = b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT)
N = len(CHAT)

FRAMING = [
    # Content-Length and Transfer-Encoding together, in every order and spelling.
    Case.of("cl-and-te", head("Host: p", f"Content-Length: {N}", "Transfer-Encoding: chunked") + CHUNKED_CHAT + SMUGGLED, "4xx"),
    Case.of("te-and-cl", head("Host: p", "Transfer-Encoding: chunked", "Content-Length: 4") + b"0\r\n\r\n" + SMUGGLED, "4xx"),
    Case.of("duplicate-cl-same", head("Host: p", f"Content-Length: {N}", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("duplicate-cl-differ", head("Host: p", f"Content-Length: {N}", "Content-Length: 5") + CHAT, "4xx"),
    Case.of("cl-list", head("Host: p", f"Content-Length: {N}, {N}") + CHAT, "4xx"),
    Case.of("cl-inner-space", head("Host: p", f"Content-Length: {N} 0") + CHAT, "4xx"),
    Case.of("cl-plus-sign", head("Host: p", f"Content-Length: +{N}") + CHAT, "4xx"),
    Case.of("cl-minus-sign", head("Host: p", "Content-Length: -1") + CHAT, "4xx"),
    Case.of("cl-hex", head("Host: p", f"Content-Length: 0x{N:x}") + CHAT, "4xx"),
    Case.of("cl-overflow", head("Host: p", "Content-Length: 99999999999999999999999") + CHAT, "4xx"),
    Case.of("cl-space-before-colon", head("Host: p", f"Content-Length : {N}") + CHAT, "4xx"),
    Case.of("cl-optional-whitespace", head("Host: p", f"Content-Length: \t{N} ") + CHAT, "2xx"),
    Case.of("te-leading-space", head("Host: p", "Transfer-Encoding:  chunked") + CHUNKED_CHAT, "2xx"),
    Case.of("te-chunked-identity", head("Host: p", "Transfer-Encoding: chunked, identity") + CHUNKED_CHAT + SMUGGLED, "4xx"),
    Case.of("te-xchunked", head("Host: p", "Transfer-Encoding: xchunked", f"Content-Length: {N}") + CHAT + SMUGGLED, "4xx"),
    Case.of("te-unknown", head("Host: p", "Transfer-Encoding: gzip") + CHUNKED_CHAT, "4xx"),
    Case.of("te-twice", head("Host: p", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked") + CHUNKED_CHAT + SMUGGLED, "4xx"),
    Case.of("te-space-before-colon", head("Host: p", "Transfer-Encoding : chunked", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("te-in-http10", head("Host: p", "Transfer-Encoding: chunked", request_line=f"POST {CHAT_PATH} HTTP/1.0") + CHUNKED_CHAT + SMUGGLED, "4xx"),
    # Line endings and bytes a header may not hold.
    Case.of("bare-cr-in-value", head("Host: p", "X-A: a\rb", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("bare-lf-everywhere", head("Host: p", f"Content-Length: {N}", end="\n") + CHAT, "4xx"),
    Case.of("bare-lf-head-end", head("Host: p", f"Content-Length: {N}")[:-2] + b"\n" + CHAT, "4xx"),
    Case.of("bare-lf-one-line", f"POST {CHAT_PATH} HTTP/1.1\r\nHost: p\nContent-Length: {N}\r\n\r\n".encode() + CHAT, "4xx"),
    Case.of("obs-fold", head("Host: p", "X-A: a", " folded", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("obs-fold-cl", head("Host: p", "Content-Length:", f" {N}") + CHAT, "4xx"),
    Case.of("nul-in-value", head("Host: p", "X-A: a\x00b", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("nul-in-name", head("Host: p", "X-\x00A: a", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("space-in-name", head("Host: p", "X A: a", f"Content-Length: {N}") + CHAT, "4xx"),
    # Chunk sizes.
    Case.of("chunk-size-not-hex", head("Host: p", "Transfer-Encoding: chunked") + b"zz\r\n" + CHAT + b"\r\n0\r\n\r\n", "4xx"),
    Case.of("chunk-size-negative", head("Host: p", "Transfer-Encoding: chunked") + b"-1\r\n" + CHAT + b"\r\n0\r\n\r\n", "4xx"),
    Case.of("chunk-size-overflow", head("Host: p", "Transfer-Encoding: chunked") + b"ffffffffffffffffffff\r\n" + CHAT + b"\r\n0\r\n\r\n", "4xx"),
    Case.of("chunk-size-0x", head("Host: p", "Transfer-Encoding: chunked") + b"0x%x\r\n%b\r\n0\r\n\r\n" % (N, CHAT), "4xx"),
    Case.of("chunk-data-too-long", head("Host: p", "Transfer-Encoding: chunked") + b"2\r\n" + CHAT + b"\r\n0\r\n\r\n", "4xx"),
    Case.of("chunk-extension", head("Host: p", "Transfer-Encoding: chunked") + b"%x;name=value\r\n%b\r\n0\r\n\r\n" % (N, CHAT), "2xx"),
    Case.of("chunk-extension-bare-lf", head("Host: p", "Transfer-Encoding: chunked") + b"%x;a=b\n%b\r\n0\r\n\r\n" % (N, CHAT), "4xx"),
    # Pipelining, with and without leftover bytes.
    Case.of("pipelined-two", post() + post(), "2xx", "2xx", answers=2),
    Case.of("pipelined-then-garbage", post() + b"GARBAGE\r\n\r\n", "2xx", "4xx", answers=2, also=(("4xx",),), may_differ=True),
    Case("pipelined-then-garbage-later", (post(), b"GARBAGE\r\n\r\n"), ("2xx", "4xx"), answers=2, pause_s=0.1),
    Case.of("pipelined-then-bare-lf", post() + b"GET /healthz HTTP/1.1\nHost: p\n\n", "2xx", "4xx", answers=2, also=(("4xx",),), may_differ=True),
    Case("pipelined-then-bare-lf-later", (post(), b"GET /healthz HTTP/1.1\nHost: p\n\n"), ("2xx", "4xx"), answers=2, pause_s=0.1),
    Case.of("body-longer-than-cl", head("Host: p", "Content-Length: 10") + CHAT, "2xx", "4xx", answers=2, also=(("4xx",),), may_differ=True),
    Case("body-longer-than-cl-later", (head("Host: p", "Content-Length: 10") + CHAT[:10], CHAT[10:]), ("2xx", "4xx"), answers=2, pause_s=0.1),
    # Request lines.
    Case.of("http-1.2", head("Host: p", f"Content-Length: {N}", request_line=f"POST {CHAT_PATH} HTTP/1.2") + CHAT, "4xx"),
    Case.of("http-2-version", head("Host: p", f"Content-Length: {N}", request_line=f"POST {CHAT_PATH} HTTP/2.0") + CHAT, "2xx"),
    Case.of("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "4xx"),
    Case.of("lowercase-method", head("Host: p", f"Content-Length: {N}", request_line=f"post {CHAT_PATH} HTTP/1.1") + CHAT, "4xx"),
    Case.of("double-space", head("Host: p", f"Content-Length: {N}", request_line=f"POST  {CHAT_PATH} HTTP/1.1") + CHAT, "2xx"),
    Case.of("no-version", f"POST {CHAT_PATH}\r\n\r\n".encode(), "2xx"),
]  # fmt: skip

TARGETS = [
    Case.of("absolute-form-other-host", post(f"http://127.0.0.1:{OTHER}{CHAT_PATH}", host=f"127.0.0.1:{OTHER}"), "4xx"),
    Case.of("absolute-form-proxy-host", post(f"http://proxy{CHAT_PATH}"), "4xx"),
    Case.of("absolute-form-passthrough", f"GET http://127.0.0.1:{OTHER}/openai/v1/models HTTP/1.1\r\nHost: p\r\n\r\n".encode(), "4xx"),
    Case.of("absolute-form-https", post(f"https://127.0.0.1:{OTHER}{CHAT_PATH}"), "4xx"),
    Case.of("network-path", post(f"//127.0.0.1:{OTHER}{CHAT_PATH}"), "4xx"),
    Case.of("network-path-after-provider", post(f"/openai//127.0.0.1:{OTHER}/v1/chat/completions"), "2xx"),
    Case.of("dot-dot-out-of-provider", post("/openai/../../v1/chat/completions"), "4xx", also=FORWARDED_INSIDE),
    Case.of("dot-dot-out-of-base", post("/openai/v1/../../../../admin"), "4xx", also=FORWARDED_INSIDE),
    Case.of("dot-dot-inside", post("/openai/v1/x/../chat/completions"), "2xx"),
    Case.of("encoded-dot-dot", post("/openai/%2e%2e/%2e%2e/admin"), "4xx", also=FORWARDED_INSIDE),
    Case.of("encoded-dot-dot-in-tail", post("/openai/v1/%2e%2e/%2e%2e/%2E%2E/admin"), "4xx", also=FORWARDED_INSIDE),
    Case.of("encoded-slash-dot-dot", post("/openai/v1/..%2f..%2f..%2fadmin"), "4xx", also=FORWARDED_INSIDE),
    Case.of("encoded-provider", post("/%6fpenai/v1/chat/completions"), "4xx"),
    Case.of("encoded-slash", post("/openai%2fv1/chat/completions"), "4xx"),
    Case.of("at-host", post(f"/openai@127.0.0.1:{OTHER}/v1/chat/completions"), "4xx"),
    Case.of("at-host-after-provider", post(f"/openai/@127.0.0.1:{OTHER}/v1/chat/completions"), "2xx"),
    Case.of("backslashes", post("/openai\\..\\..\\v1/chat/completions"), "4xx", also=FORWARDED_INSIDE),
    Case.of("backslash-host", f"GET /openai/\\\\127.0.0.1:{OTHER}/v1 HTTP/1.1\r\nHost: p\r\n\r\n".encode(), "2xx"),
    Case.of("fragment", post("/openai/v1/chat/completions#frag"), "2xx"),
    Case.of("connect", f"CONNECT 127.0.0.1:{OTHER} HTTP/1.1\r\nHost: 127.0.0.1:{OTHER}\r\n\r\n".encode(), "4xx", also=CLEAN_CLOSE, may_differ=True),
    Case.of("options-asterisk", b"OPTIONS * HTTP/1.1\r\nHost: p\r\n\r\n", "4xx"),
    Case.of("post-asterisk", post("*"), "4xx"),
    Case.of("host-other", post(host=f"127.0.0.1:{OTHER}"), "2xx"),
    Case.of("host-other-passthrough", f"GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1:{OTHER}\r\n\r\n".encode(), "2xx"),
    Case.of("missing-host", head(f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("several-hosts", head("Host: proxy", f"Host: 127.0.0.1:{OTHER}", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("empty-host", head("Host:", f"Content-Length: {N}") + CHAT, "2xx"),
]  # fmt: skip

UPGRADES = [
    Case.of("h2c-upgrade-get", b"GET /openai/v1/models HTTP/1.1\r\nHost: p\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", "2xx", also=CLEAN_CLOSE, may_differ=True),
    Case.of("h2c-upgrade-metered", head("Host: p", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__", f"Content-Length: {N}") + CHAT, "2xx", also=CLEAN_CLOSE, may_differ=True),
    Case.of("websocket-upgrade", b"GET /openai/v1/realtime HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", "2xx", also=CLEAN_CLOSE, may_differ=True),
    Case.of("upgrade-then-bytes", head("Host: p", "Connection: Upgrade", "Upgrade: websocket", f"Content-Length: {N}") + CHAT + b"\x81\x05hello", "2xx", "4xx", answers=2, also=CLEAN_CLOSE, may_differ=True),
    Case.of("connect-with-body", f"CONNECT 127.0.0.1:{OTHER} HTTP/1.1\r\nHost: 127.0.0.1:{OTHER}\r\nContent-Length: 4\r\n\r\nPING".encode(), "4xx", "4xx", answers=2, also=CLEAN_CLOSE, may_differ=True),
]  # fmt: skip

BIG_BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * (1 << 20) + b'"}]}'
LIMITS = [
    Case.of("body-over-limit", post(body=BIG_BODY), "4xx"),
    Case("body-over-limit-declared", (head("Host: p", f"Content-Length: {100 << 20}") + b"{" * 65536,), ("4xx",)),
    Case("body-over-limit-chunked", (head("Host: p", "Transfer-Encoding: chunked"), *[b"10000\r\n" + b"a" * 0x10000 + b"\r\n"] * 20, b"0\r\n\r\n"), ("4xx",)),
    Case.of("header-80k-one-write", head("Host: p", "X-Big: " + "a" * 80_000, f"Content-Length: {N}") + CHAT, "4xx"),
    Case("header-80k-two-writes", (head("Host: p", "X-Big: " + "a" * 80_000, f"Content-Length: {N}")[:40_000], head("Host: p", "X-Big: " + "a" * 80_000, f"Content-Length: {N}")[40_000:] + CHAT), ("4xx",)),
    Case.of("header-line-over-8190", head("Host: p", "X-Big: " + "a" * 8200, f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("header-name-over-8190", head("Host: p", "X-" + "a" * 8200 + ": v", f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("header-just-under-8190", head("Host: p", "X-Big: " + "a" * 8000, f"Content-Length: {N}") + CHAT, "2xx"),
    Case.of("request-line-over-8190", post("/openai/v1/chat/completions?q=" + "a" * 8200), "4xx"),
    Case.of("headers-129", head("Host: p", *[f"X-H{i}: v" for i in range(129)], f"Content-Length: {N}") + CHAT, "4xx"),
    Case.of("headers-100", head("Host: p", *[f"X-H{i}: v" for i in range(100)], f"Content-Length: {N}") + CHAT, "2xx"),
    Case.of("headers-10000-one-write", head("Host: p", *[f"X-H{i}: v" for i in range(10_000)], f"Content-Length: {N}") + CHAT, "4xx"),
    Case("headers-10000-two-writes", (head("Host: p", *[f"X-H{i}: v" for i in range(10_000)])[:50_000], head("Host: p", *[f"X-H{i}: v" for i in range(10_000)], f"Content-Length: {N}")[50_000:] + CHAT), ("4xx",)),
    Case("head-never-ends", tuple([f"POST {CHAT_PATH} HTTP/1.1\r\nHost: p\r\n".encode()] + [b"X-Dribble: " + b"a" * 1000 + b"\r\n"] * 150), ("4xx",), pause_s=0.001),
]  # fmt: skip

SLOW = [
    Case("head-dribbled", (*(bytes([b]) for b in post()[:-N]), CHAT), ("2xx",), pause_s=0.001),
    Case("body-dribbled", (post()[: -N], *[CHAT[i : i + 8] for i in range(0, N, 8)]), ("2xx",), pause_s=0.02),
    Case("headers-one-by-one", (f"POST {CHAT_PATH} HTTP/1.1\r\n".encode(), *[f"X-H{i}: v\r\n".encode() for i in range(40)], f"Host: p\r\nContent-Length: {N}\r\n\r\n".encode() + CHAT), ("2xx",), pause_s=0.01),
]  # fmt: skip


@dataclass
class Outcome:
    verdict: Verdict
    #: Request targets the upstream received.
    upstream_targets: list[str]
    upstream_requests: list[bytes]
    other_host_connections: int
    #: Largest buffer a fast-path connection held while the case ran (0 with the fast path off).
    most_buffered: int


async def run_case(case: Case, fast_path: bool) -> Outcome:
    async with (
        raw_upstream(respond_with(OK)) as upstream,
        counting_listener() as other,
        one_proxy(upstream.url + BASE, fast_path) as proxy,
    ):
        writes = [w.replace(OTHER.encode(), str(other.port).encode()) for w in case.writes]
        most = 0
        fast = proxy.runner.server

        async def watch() -> None:
            nonlocal most
            while isinstance(fast, FastPathServer):
                most = max([most, *(len(c.received) for c in fast.connections)])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            verdict = await exchange(port_of(proxy.url), writes, case.answers, case.pause_s)
        finally:
            watcher.cancel()
        await proxy.flush()
        targets = [r.split(b" ", 2)[1].decode("latin-1") for r in upstream.requests]
        return Outcome(verdict, targets, upstream.requests, other.accepted, most)


def inside_base(target: str) -> bool:
    """The target, decoded and with dot segments resolved as an upstream server would, stays under the
    base path."""
    path = unquote(target.split("?")[0]).replace("\\", "/")
    resolved = posixpath.normpath(path)
    return resolved == BASE or resolved.startswith(BASE + "/")


@pytest.mark.parametrize("case", FRAMING + TARGETS + UPGRADES + LIMITS + SLOW, ids=lambda case: case.id)
async def test_hostile_request(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    fast, plain = await asyncio.gather(run_case(case, True), run_case(case, False))
    for name, outcome in (("fast path", fast), ("aiohttp", plain)):
        verdict = outcome.verdict
        assert verdict.garbled is None, f"{name}: {verdict.garbled}: {verdict.raw[:300]!r}"
        assert verdict.summary in case.accepted, f"{name}: {verdict.summary} {verdict.raw[:300]!r}"
        assert outcome.other_host_connections == 0, name
        assert all(inside_base(t) for t in outcome.upstream_targets), (
            name,
            [t[:200] for t in outcome.upstream_targets],
        )
        assert not any(b"SMUGGLED" in r.split(b"\r\n")[0] for r in outcome.upstream_requests), name
        if "2xx" not in verdict.summary:  # refused: nothing of it went upstream
            assert not outcome.upstream_requests, (name, outcome.upstream_requests)
    if not case.may_differ:
        assert fast.verdict.summary == plain.verdict.summary
        assert fast.verdict.statuses == plain.verdict.statuses, (
            fast.verdict.raw[:300],
            plain.verdict.raw[:300],
        )
    # The fast path buffers at most one head's worth (its limit) plus the body of a metered call.
    assert fast.most_buffered <= 192 * 1024, fast.most_buffered
    assert_no_tracebacks(caplog)
