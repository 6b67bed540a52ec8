"""The meter's copy of a forwarded response: streams parsed in the record pipeline while the worker's
budget lasts, in the worker past it, and the same record either way."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from llmtally.exchange import Exchange
from llmtally.providers import ADAPTERS
from llmtally.proxy.app import STATE_KEY, meter_call
from llmtally.proxy.metering_copy import TOO_LARGE_TO_METER, MeteringCopy, StreamBudget
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import only_record, serve_post

#: The worker's budget for streams parsed in the record pipeline, in bytes: none (always parsed in
#: the worker), 1 KB (every stream here is longer: switched to the worker mid-stream), the default.
BUDGETS = [0, 1024, 32 * 1024 * 1024]

STREAMS: dict[str, tuple[str, bytes, dict[str, str]]] = {
    "anthropic": (
        "/anthropic/v1/messages",
        b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}',
        {"x-api-key": API_KEY},
    ),
    "gemini-sse": (
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}',
        {"x-goog-api-key": API_KEY},
    ),
    "gemini-array": (
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}',
        {"x-goog-api-key": API_KEY},
    ),
    "openai-usage-asked": (
        "/openai/v1/chat/completions",
        b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"hi"}]}',
        {"Authorization": f"Bearer {API_KEY}"},
    ),
    # No usage in the stream (injection off below): the output is estimated from the parsed text.
    "openai-no-usage": (
        "/openai/v1/chat/completions",
        b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        {"Authorization": f"Bearer {API_KEY}"},
    ),
}
COMPARED = (
    "input_tokens", "output_tokens", "cache_read_tokens", "reasoning_tokens", "usage_source",
    "total_cost", "model", "error", "status", "stream",
)  # fmt: skip


async def _stream_through(make_proxy: MakeProxy, name: str, budget: int) -> tuple[bytes, dict[str, Any]]:
    path, body, headers = STREAMS[name]
    proxy = await make_proxy(inject_stream_usage=name != "openai-no-usage")
    proxy.app[STATE_KEY].stream_budget.limit = budget
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + path, data=body, headers=headers) as response,
    ):
        assert response.status == 200
        received = await response.read()
    return received, await only_record(proxy)


@pytest.mark.parametrize("name", list(STREAMS))
async def test_a_stream_is_metered_the_same_wherever_it_is_parsed(
    make_proxy: MakeProxy, upstream: FakeUpstream, name: str
) -> None:
    upstream.config.chunks = 24  # ~2-6 KB of events: past 1 KB, within 256 KB
    results = [await _stream_through(make_proxy, name, budget) for budget in BUDGETS]
    received = {r[0] for r in results}
    assert len(received) == 1  # the client's bytes never depend on where metering happens
    records = [{k: r[1][k] for k in COMPARED} for r in results]
    assert records[0] == records[1] == records[2]
    assert records[0]["error"] is None and records[0]["output_tokens"] > 0
    expected_source = "estimated" if name == "openai-no-usage" else "provider"
    assert records[0]["usage_source"] == expected_source


def _exchange(provider: str, path: str, body: bytes) -> Exchange:
    adapter = ADAPTERS[provider]  # type: ignore[index]
    endpoint = adapter.route(path)
    assert endpoint is not None
    request = adapter.prepare(endpoint, body, {}, True)
    return Exchange("id", provider, request, datetime.now(UTC), status=200)  # type: ignore[arg-type]


def _anthropic_events(deltas: int) -> list[bytes]:
    def event(obj: dict[str, Any]) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    usage = {"input_tokens": 7, "output_tokens": 1}
    start = {"type": "message_start", "message": {"model": "claude-sonnet-5", "usage": usage}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word "}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": deltas}}
    return [event(start), *(event(delta) for _ in range(deltas)), event(end), event({"type": "message_stop"})]


def _copy(
    exchange: Exchange, *, stream: bool, budget: StreamBudget | None = None, max_body: int = 1 << 20
) -> MeteringCopy:
    return MeteringCopy(
        exchange,
        ADAPTERS[exchange.provider],
        exchange.request,
        stream=stream,
        encoding="identity",
        max_body=max_body,
        budget=budget or StreamBudget(64 * 1024),
    )


ANTHROPIC_STREAM = b'{"model":"claude-sonnet-5","stream":true}'


def test_a_short_stream_goes_to_the_record_pipeline_whole() -> None:
    exchange = _exchange("anthropic", "v1/messages", ANTHROPIC_STREAM)
    budget = StreamBudget(64 * 1024)
    copy = _copy(exchange, stream=True, budget=budget)
    events = _anthropic_events(10)
    for event in events:
        copy.feed(event)
    assert budget.held == sum(map(len, events))
    copy.hand_over()
    assert exchange.summary is None  # nothing parsed in the worker
    assert exchange.response_chunks == events and exchange.response_stream
    assert budget.held == 0


def test_past_the_budget_a_stream_is_parsed_as_it_passes() -> None:
    exchange = _exchange("anthropic", "v1/messages", ANTHROPIC_STREAM)
    budget = StreamBudget(1024)
    copy = _copy(exchange, stream=True, budget=budget)
    held = []
    for event in _anthropic_events(200):
        copy.feed(event)
        held.append(budget.held)
    copy.hand_over()
    assert max(held) <= 1024 and held[-1] == 0  # bounded, then parsed from what was kept onwards
    assert exchange.response_chunks is None and not exchange.response_stream
    assert exchange.summary is not None and exchange.summary.usage is not None
    assert (exchange.summary.usage.input_tokens, exchange.summary.usage.output_tokens) == (7, 200)
    assert "".join(exchange.summary.output_text) == "word " * 200


def test_the_budget_is_shared_by_a_worker_s_streams() -> None:
    budget = StreamBudget(1024)
    first_exchange = _exchange("anthropic", "v1/messages", ANTHROPIC_STREAM)
    second_exchange = _exchange("anthropic", "v1/messages", ANTHROPIC_STREAM)
    first = _copy(first_exchange, stream=True, budget=budget)
    second = _copy(second_exchange, stream=True, budget=budget)
    events = _anthropic_events(3)  # ~660 bytes: one stream fits, two do not
    for copy in (first, second):
        for event in events:
            copy.feed(event)
    assert first.held == budget.held > 0 and second.held == 0 and second.parser is not None
    first.hand_over()
    second.hand_over()
    assert first_exchange.response_chunks == events and second_exchange.summary is not None
    assert budget.held == 0


def test_part_of_a_body_is_dropped_but_part_of_a_stream_is_kept() -> None:
    body_exchange = _exchange("openai", "v1/chat/completions", b'{"model":"gpt-4o"}')
    body_copy = _copy(body_exchange, stream=False)
    body_copy.feed(b'{"id":"chatcmpl-1","usage":')
    body_copy.hand_over(whole=False)
    assert body_exchange.response_chunks is None and body_exchange.summary is None

    stream_exchange = _exchange("anthropic", "v1/messages", ANTHROPIC_STREAM)
    stream_copy = _copy(stream_exchange, stream=True)
    stream_copy.feed(_anthropic_events(3)[0])
    stream_copy.hand_over(whole=False)
    assert stream_exchange.response_chunks is not None and stream_exchange.response_stream


def test_a_body_past_max_body_is_not_kept() -> None:
    exchange = _exchange("openai", "v1/chat/completions", b'{"model":"gpt-4o"}')
    copy = _copy(exchange, stream=False, max_body=10)
    copy.feed(b"0123456789abc")
    copy.hand_over()
    assert exchange.response_chunks is None and exchange.error == TOO_LARGE_TO_METER


async def _gzip_stream_upstream(events: list[bytes]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        gz = zlib.compressobj(wbits=31)
        for event in events:  # one compressed piece per event, as a provider's gzip stream arrives
            await response.write(gz.compress(event) + gz.flush(zlib.Z_SYNC_FLUSH))
        await response.write(gz.flush())
        await response.write_eof()
        return response

    return await serve_post("/v1/messages", handler)


@pytest.mark.parametrize("budget", BUDGETS)
async def test_a_compressed_stream_is_decoded_for_metering_and_forwarded_as_sent(budget: int) -> None:
    events = _anthropic_events(60)
    runner, url = await _gzip_stream_upstream(events)
    proxy = await start_proxy(config_for_upstream(url))
    proxy.app[STATE_KEY].stream_budget.limit = budget
    try:
        headers = {"x-api-key": API_KEY, "Accept-Encoding": "gzip"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(
                proxy.url + "/anthropic/v1/messages", data=ANTHROPIC_STREAM, headers=headers
            ) as response,
        ):
            assert response.headers["Content-Encoding"] == "gzip"
            received = await response.read()
        assert zlib.decompress(received, wbits=31) == b"".join(events)
        record = await only_record(proxy)
        assert (record["input_tokens"], record["output_tokens"], record["usage_source"]) == (
            7,
            60,
            "provider",
        )
        assert record["error"] is None
    finally:
        await proxy.stop()
        await runner.cleanup()


class _BrokenDownstream:
    """A client connection whose writes fail with a bug (not a disconnect) after the head."""

    def gone(self) -> bool:
        return False

    def send_whole(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        raise AssertionError("a stream is not answered whole")

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], hold_head: bool) -> None:
        return None

    async def write(self, data: bytes) -> None:
        raise RuntimeError("a bug while writing")

    async def finish(self) -> None:
        return None

    def abort(self) -> None:
        return None


async def test_a_bug_mid_stream_still_frees_the_budget_and_records_the_call(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    state = proxy.app[STATE_KEY]
    path, body, headers = STREAMS["anthropic"]
    route = state.platforms["anthropic"].route("POST", "v1/messages", {})
    assert route.endpoint is not None
    with pytest.raises(RuntimeError, match="a bug while writing"):
        await meter_call(state, _BrokenDownstream(), route, path, list(headers.items()), body, {}, 0.0)
    assert state.stream_budget.held == 0
    record = await only_record(proxy)
    assert record["status"] == 200 and record["stream"] is True
