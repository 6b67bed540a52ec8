"""The official anthropic SDK through the proxy: Messages, streamed and not, with caching and thinking."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import pytest

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import assert_usage, money, only_record

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
# claude-sonnet-5: $2 input, $0.20 cache read, $2.50 5-minute write, $4 1-hour write, $10 output per 1M.
# Fake usage: input_tokens 50 (uncached), cache write 1500 (5m) + 500 (1h), cache read 10000, output 400.
SONNET = {
    "input_tokens": 12050,  # 50 + 2000 + 10000: Anthropic's input_tokens excludes cache fields
    "output_tokens": 400,
    "cache_read_tokens": 10000,
    "cache_write_tokens": 2000,
    "cache_write_1h_tokens": 500,
    "reasoning_tokens": None,
    "total_tokens": 12450,
    "usage_source": "provider",
    "input_cost": "0.00785",  # 50*2 + 10000*0.2 + 1500*2.5 + 500*4 = 7850 µ$
    "output_cost": "0.004",
    "total_cost": "0.01185",
    "model": "claude-sonnet-5",
    "request_model": "claude-sonnet-5",
    "service_tier": "standard",
}


def clients(
    proxy: RunningProxy, upstream: FakeUpstream
) -> tuple[anthropic.AsyncAnthropic, anthropic.AsyncAnthropic]:
    via = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0)
    direct = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=upstream.url, max_retries=0)
    return via, direct


@pytest.mark.parametrize("thinking", [False, True])
async def test_message(proxy: RunningProxy, upstream: FakeUpstream, thinking: bool) -> None:
    via, direct = clients(proxy, upstream)
    extra: Any = {"thinking": {"type": "enabled", "budget_tokens": 1024}} if thinking else {}
    raw = await via.messages.with_raw_response.create(
        model="claude-sonnet-5", max_tokens=2000, messages=MESSAGES, **extra
    )
    direct_raw = await direct.messages.with_raw_response.create(
        model="claude-sonnet-5", max_tokens=2000, messages=MESSAGES, **extra
    )
    assert raw.http_response.content == direct_raw.http_response.content
    message = await raw.parse()
    assert message.content[-1].text == "Hello from the"  # type: ignore[union-attr]
    record = await only_record(proxy)
    assert_usage(record, provider="anthropic", endpoint="messages", stream=False, **SONNET)
    assert record["upstream_request_id"] == "req_fake_anthropic_0001"
    assert record["estimated_input_tokens"] is None  # provider usage only, unless estimate_input is on


async def test_estimate_input_counts_the_request_beside_provider_usage(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(estimate_input=True)
    via, _ = clients(proxy, upstream)
    await via.messages.create(model="claude-sonnet-5", max_tokens=100, messages=MESSAGES)
    record = await only_record(proxy)
    assert_usage(record, provider="anthropic", endpoint="messages", stream=False, **SONNET)
    assert record["estimated_input_tokens"] > 0  # an estimate (scaled o200k_base), beside the billed 12,050


@pytest.mark.parametrize("thinking", [False, True])
async def test_stream(proxy: RunningProxy, upstream: FakeUpstream, thinking: bool) -> None:
    via, direct = clients(proxy, upstream)
    extra: Any = {"thinking": {"type": "enabled", "budget_tokens": 1024}} if thinking else {}
    kwargs: Any = {
        "model": "claude-sonnet-5",
        "max_tokens": 2000,
        "messages": MESSAGES,
        "stream": True,
        **extra,
    }
    async with via.messages.with_streaming_response.create(**kwargs) as response:
        proxied = b"".join([chunk async for chunk in response.iter_bytes()])
    async with direct.messages.with_streaming_response.create(**kwargs) as response:
        plain = b"".join([chunk async for chunk in response.iter_bytes()])
    assert proxied == plain
    # message_start and message_delta both carry the input and cache fields; they must not be summed.
    assert_usage(await only_record(proxy), stream=True, **SONNET)


async def test_stream_helper(proxy: RunningProxy) -> None:
    via = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0)
    async with via.messages.stream(model="claude-sonnet-5", max_tokens=100, messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the"
    assert final.usage.output_tokens == 400
    assert_usage(await only_record(proxy), stream=True, **SONNET)


async def test_count_tokens_endpoint_passes_through_unmetered(proxy: RunningProxy) -> None:
    via = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0)
    counted = await via.messages.count_tokens(model="claude-sonnet-5", messages=MESSAGES)
    assert counted.input_tokens == 42
    await proxy.flush()
    assert proxy.records == []


async def test_upstream_error_is_recorded_and_returned(proxy: RunningProxy) -> None:
    via = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0)
    with pytest.raises(anthropic.InternalServerError):
        await via.messages.create(model="fake-error-500", max_tokens=10, messages=MESSAGES)
    record = await only_record(proxy)
    assert record["status"] == 500
    assert record["usage_source"] == "none"
    assert record["error"] == "upstream error: server_error"
    assert record["total_cost"] is None


@pytest.mark.parametrize("stream", [False, True])
async def test_web_search_and_fetch_are_line_items_in_the_cost(
    proxy: RunningProxy, upstream: FakeUpstream, stream: bool
) -> None:
    # The fake reports 2 web searches and 1 web fetch when the request offers those server tools.
    via, _ = clients(proxy, upstream)
    tools: Any = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 5},
    ]
    kwargs: Any = {"model": "claude-sonnet-4-5", "max_tokens": 2000, "messages": MESSAGES, "tools": tools}
    if stream:
        async with via.messages.stream(**kwargs) as events:
            await events.get_final_message()
    else:
        await via.messages.create(**kwargs)
    record = await only_record(proxy)
    # genai-prices: web search $10 per 1,000 for Claude Sonnet 4.5; web fetch: no charge (fee table).
    assert [(i["item"], i["quantity"], i["unit"], i["source"]) for i in record["line_items"]] == [
        ("web_fetch", 1, "fetch", "fee_table:2026-12-01"),
        ("web_search", 2, "search", "genai-prices"),
    ]
    assert [money(i["cost"]) for i in record["line_items"]] == [Decimal(0), Decimal("0.02")]
    tokens = money(record["input_cost"]) + money(record["output_cost"])
    assert money(record["total_cost"]) == tokens + Decimal("0.02") == Decimal("0.017775") + Decimal("0.02")
