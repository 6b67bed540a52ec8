"""The campaign, secrets: no API key in any byte ``llmtally serve`` writes, whatever happens.

A real ``llmtally serve`` process (debug logging, a file sink, a protobuf sink, a spill dir fed by a
webhook that refuses everything) takes a representative set of the campaign's cases, each carrying
distinctive keys in ``Authorization``, ``x-api-key``, ``x-goog-api-key`` and ``?key=``: good calls of
each provider, upstream stalls, resets, oversized heads and lying lengths on the metered and the
passthrough path, and hostile request bytes whose offending line is the one holding the key. Then
every byte written is scanned for the keys: stdout, stderr, every file under the sinks' and the
spill dir, every answer the clients got, and ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.proxy.campaign_helpers import (
    STREAM_CHAT,
    UpstreamConn,
    chat_completion,
    exchange,
    http_response,
    port_of,
    raw_upstream,
)
from tests.proxy.test_server import serving

OPENAI_KEY = "sk-campaign-OPENAIKEY-5b1e7d"
ANTHROPIC_KEY = "sk-ant-campaign-ANTHROPICKEY-93c2aa"
GOOGLE_KEY = "AIzaCampaignGOOGLEHEADERKEY0f6d"
QUERY_KEY = "AIzaCampaignQUERYKEY41e8b"
KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GOOGLE_KEY, QUERY_KEY)

ANTHROPIC_MESSAGE = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",'
    b'"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",'
    b'"usage":{"input_tokens":5,"output_tokens":2}}'
)
GEMINI_ANSWER = (
    b'{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"},"finishReason":"STOP"}],'
    b'"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":2},"modelVersion":"gemini-2.5-flash"}'
)
OPENAI_STREAM = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\ndata: [DONE]\n\n'
)


async def by_marker(conn: UpstreamConn) -> None:
    """An upstream that misbehaves as each request's marker (in its path or body) says."""
    while True:
        request = await conn.read_request()
        if b"campaign-stall" in request:
            await asyncio.sleep(5)
            return
        if b"campaign-reset" in request:
            conn.reset()
            return
        if b"campaign-bighead" in request:
            await conn.send(http_response(b"{}", headers="X-Big: " + "a" * 100_000 + "\r\n"))
        elif b"campaign-short" in request:
            await conn.send(
                http_response(b'{"data":[]}' + b" " * 100).replace(
                    b"Content-Length: 111", b"Content-Length: 5"
                )
            )
        elif b"campaign-500" in request:
            await conn.send(http_response(b'{"error":{"message":"boom"}}', "500 Internal Server Error"))
        elif b"campaign-huge-usage" in request:
            await conn.send(
                http_response(chat_completion("first", '{"prompt_tokens":1e30,"completion_tokens":-3}'))
            )
        elif b"/v1/messages" in request:
            await conn.send(http_response(ANTHROPIC_MESSAGE))
        elif b":generateContent" in request:
            await conn.send(http_response(GEMINI_ANSWER))
        elif b'"stream":true' in request:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            await conn.send(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(OPENAI_STREAM), OPENAI_STREAM))
        elif request.startswith(b"GET "):
            await conn.send(http_response(b'{"object":"list","data":[]}'))
        else:
            await conn.send(http_response(chat_completion()))


def request(method: str, path: str, headers: str, body: bytes = b"", framing: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: proxy\r\n{headers}{framing or length}\r\n".encode() + body


OPENAI = f"Authorization: Bearer {OPENAI_KEY}\r\nContent-Type: application/json\r\n"
ANTHROPIC = f"x-api-key: {ANTHROPIC_KEY}\r\nanthropic-version: 2023-06-01\r\n"
GOOGLE = f"x-goog-api-key: {GOOGLE_KEY}\r\n"
GEMINI_PATH = f"/gemini/v1beta/models/gemini-2.5-flash:generateContent?key={QUERY_KEY}"
CHAT_PATH = "/openai/v1/chat/completions"


def chat(model: str) -> bytes:
    return b'{"model":"%s","messages":[{"role":"user","content":"hi"}]}' % model.encode()


GEMINI_BODY = b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'
CALLS: list[bytes] = [
    # Good calls, every provider and key placement.
    request("POST", CHAT_PATH, OPENAI, chat("gpt-4o")),
    request("POST", CHAT_PATH, OPENAI, STREAM_CHAT),
    request("POST", "/anthropic/v1/messages", ANTHROPIC, b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}'),
    request("POST", GEMINI_PATH, "", GEMINI_BODY),
    request("POST", "/gemini/v1beta/models/gemini-2.5-flash:generateContent", GOOGLE, GEMINI_BODY),
    request("GET", f"/gemini/v1beta/models?key={QUERY_KEY}", GOOGLE),
    request("GET", "/openai/v1/models", OPENAI),
    # The upstream fails: stall, reset, oversized head, lying length, 500, absurd usage.
    request("POST", CHAT_PATH, OPENAI, chat("campaign-stall")),
    request("POST", CHAT_PATH, OPENAI, chat("campaign-reset")),
    request("POST", CHAT_PATH, OPENAI, chat("campaign-bighead")),
    request("POST", CHAT_PATH, OPENAI, chat("campaign-500")),
    request("POST", CHAT_PATH, OPENAI, chat("campaign-huge-usage")),
    request("POST", f"/gemini/v1beta/models/campaign-stall:generateContent?key={QUERY_KEY}", GOOGLE, GEMINI_BODY),
    request("POST", f"/gemini/v1beta/models/campaign-reset:generateContent?key={QUERY_KEY}", GOOGLE, GEMINI_BODY),
    request("GET", f"/gemini/v1beta/campaign-bighead?key={QUERY_KEY}", GOOGLE),
    request("GET", f"/gemini/v1beta/campaign-short?key={QUERY_KEY}", GOOGLE),
    request("GET", f"/gemini/v1beta/campaign-reset?key={QUERY_KEY}", GOOGLE),
    request("GET", f"/gemini/v1beta/campaign-stall?key={QUERY_KEY}", GOOGLE),
    request("GET", "/openai/v1/campaign-bighead", OPENAI),
    # Hostile request bytes whose offending line holds a key.
    request("POST", CHAT_PATH, f"Authorization: Bearer {OPENAI_KEY}\x00\r\n", chat("gpt-4o")),
    request("POST", CHAT_PATH, f"x-api-key: {ANTHROPIC_KEY}\rX\r\n", chat("gpt-4o")),
    request("POST", CHAT_PATH, f"Authorization: Bearer {OPENAI_KEY}\r\n", chat("gpt-4o")).replace(b"\r\n", b"\n"),
    request("POST", CHAT_PATH, f"Authorization: Bearer {OPENAI_KEY}{'a' * 9000}\r\n", chat("gpt-4o")),
    request("POST", CHAT_PATH, OPENAI + "".join(f"X-H{i}: {OPENAI_KEY}\r\n" for i in range(200)), chat("gpt-4o")),
    request("POST", CHAT_PATH, OPENAI + "Transfer-Encoding: chunked\r\n", chat("gpt-4o")),
    request("POST", f"http://127.0.0.1:9{GEMINI_PATH}", "", GEMINI_BODY),
    request("POST", f"{GEMINI_PATH}\x00", "", GEMINI_BODY),
    request("GET", f"/gemini/v1beta/models?key={QUERY_KEY}{'a' * 9000}", GOOGLE),
    request("POST", CHAT_PATH, OPENAI + "Connection: Upgrade\r\nUpgrade: websocket\r\n", chat("gpt-4o")),
    request("CONNECT", f"127.0.0.1:9?key={QUERY_KEY}", OPENAI),
    request("POST", CHAT_PATH, OPENAI, b"{" * (1 << 20) + b"x" * 1024),
]  # fmt: skip


@dataclass
class ServeRun:
    """Everything one ``llmtally serve`` run wrote, and what its clients were sent."""

    stdout: bytes = b""
    stderr: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)
    answers: list[bytes] = field(default_factory=list)
    metrics: bytes = b""
    returncode: int | None = None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: After SIGTERM (its shutdown_grace_s is 2 s).
EXIT_WITHIN_S = 6.0
#: Stands for the answer to a call that got neither an answer nor a close in time.
HUNG = b"<hung>"


async def _answer(port: int, call: bytes) -> bytes:
    """The bytes a call got back (a hang is noted, so the other calls and the scan still run)."""
    try:
        return (await exchange(port, [call])).raw
    except pytest.fail.Exception:
        return HUNG


async def _run(tmp: Path) -> ServeRun:
    run = ServeRun()
    (tmp / "sinks").mkdir()
    async with raw_upstream(by_marker) as upstream:
        config = tmp / "config.toml"
        config.write_text(
            f'[upstreams]\nopenai = "{upstream.url}"\nanthropic = "{upstream.url}"\ngemini = "{upstream.url}"\n'
            "first_byte_timeout_s = 1.0\nread_timeout_s = 1.0\nconnect_timeout_s = 2.0\n"
            "[server]\nmax_request_body_mb = 1\nshutdown_grace_s = 2.0\n"
            '[logging]\nlevel = "debug"\n'
            f'[pipeline]\nspill_dir = "{tmp / "spill"}"\nretry_attempts = 1\nretry_backoff_s = 0.05\n'
            f'[sinks.file]\npath = "{tmp / "sinks" / "records.jsonl"}"\n'
            f'[sinks.protobuf]\npath = "{tmp / "sinks" / "records.pb"}"\n'
            f'[sinks.webhook]\nurl = "http://127.0.0.1:{_closed_port()}/ingest"\ntimeout_s = 1.0\n'
        )
        async with serving(config, {}) as (process, url):
            assert process.stdout is not None and process.stderr is not None
            # Read as it comes: a process killed at the end still leaves what it wrote.
            stdout = asyncio.create_task(process.stdout.read())
            stderr = asyncio.create_task(process.stderr.read())
            port = port_of(url)
            run.answers = list(await asyncio.gather(*(_answer(port, call) for call in CALLS)))
            await asyncio.sleep(1.0)  # records built and delivered (the webhook's fail and spill)
            run.metrics = (await exchange(port, [b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n"])).raw
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), EXIT_WITHIN_S)
            except TimeoutError:
                process.kill()  # noted in returncode; what it wrote is still scanned
                await process.wait()
            run.returncode = process.returncode
            run.stdout, run.stderr = await stdout, await stderr
    for path in sorted(tmp.rglob("*")):
        if path.is_file() and path.name != "config.toml":
            run.files[str(path.relative_to(tmp))] = path.read_bytes()
    return run


@pytest.fixture(scope="module")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> ServeRun:
    """One ``llmtally serve`` run for the module's tests (each reads a different part of it)."""
    return asyncio.run(_run(tmp_path_factory.mktemp("campaign-secrets")))


def _hits(data: bytes) -> list[str]:
    return [key for key in KEYS if key.encode() in data]


def test_no_key_in_any_byte_written(serve_run: ServeRun) -> None:
    leaks = {
        "stdout": _hits(serve_run.stdout),
        "stderr": _hits(serve_run.stderr),
        "GET /metrics": _hits(serve_run.metrics),
        **{f"file {name}": _hits(data) for name, data in serve_run.files.items()},
        **{f"answer to call {i}": _hits(answer) for i, answer in enumerate(serve_run.answers)},
    }
    leaks = {where: keys for where, keys in leaks.items() if keys}
    assert not leaks, leaks
    # Not vacuous: the calls were served, metered and delivered to every sink, and some spilled.
    assert len(serve_run.stdout.splitlines()) >= 12, serve_run.stdout[:2000]
    assert serve_run.files.get("sinks/records.jsonl"), sorted(serve_run.files)
    assert any(name.startswith("spill/") and data for name, data in serve_run.files.items()), sorted(
        serve_run.files
    )
    assert b"llmtally_requests_total" in serve_run.metrics


def test_serve_exits_cleanly_after_the_campaign(serve_run: ServeRun) -> None:
    assert serve_run.returncode == 0, serve_run.stderr.decode("utf-8", "replace")[-3000:]


def test_no_traceback_on_stderr(serve_run: ServeRun) -> None:
    assert b"Traceback" not in serve_run.stderr, serve_run.stderr.decode("utf-8", "replace")[-4000:]


def test_every_call_was_answered_or_cleanly_closed(serve_run: ServeRun) -> None:
    hung = [i for i, answer in enumerate(serve_run.answers) if answer == HUNG]
    assert not hung, [CALLS[i][:120] for i in hung]
    for i, answer in enumerate(serve_run.answers):  # an answer, when there is one, is HTTP
        assert not answer or answer.startswith(b"HTTP/1."), (i, answer[:200])
