"""The TokenTracker library API, fed with real SDK response objects from the fake upstream."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import types

from llmtally import (
    CallParams,
    Config,
    TokenCount,
    TokenCountParams,
    TokenTracker,
    UnknownModelError,
)
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream
from tests.conftest import API_KEY

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def tracker() -> TokenTracker:
    return TokenTracker()


# ---- count_tokens ---------------------------------------------------------------------------------


def test_count_text_and_list_of_texts(tracker: TokenTracker) -> None:
    one = tracker.count_tokens(TokenCountParams(model="gpt-4o", text="hello world"))
    assert one == TokenCount(input_tokens=2, exact=True, tokenizer="o200k_base")
    many = tracker.count_tokens(TokenCountParams(model="gpt-4o", text=["hello world", "hello world"]))
    assert (many.input_tokens, many.total_tokens) == (4, 4)  # no chat overhead for texts


def test_count_messages_with_tools_and_response(tracker: TokenTracker) -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "Do f", "parameters": {}}}]
    count = tracker.count_tokens(
        TokenCountParams(model="gpt-4o-2024-08-06", messages=MESSAGES, tools=tools, response="Hello there!",
                         count_response_tokens=True)
    )  # fmt: skip
    assert count.input_tokens > 10 and count.response_tokens == 3
    assert count.total_tokens == count.input_tokens + 3
    assert not count.exact  # tools: OpenAI's hidden prompt is not published


def test_provider_inferred_from_model_names(tracker: TokenTracker) -> None:
    for model, provider in [
        ("gpt-4o-2024-08-06", "openai"), ("ft:gpt-4o-mini:org::abc", "openai"), ("gpt-35-turbo", "openai"),
        ("claude-sonnet-4-5-20250929", "anthropic"), ("models/gemini-2.5-flash", "gemini"),
        ("o3-mini", "openai"),
    ]:  # fmt: skip
        assert tracker.provider_of(model) == provider, model


def test_unknown_model_estimates_or_raises_in_strict_mode(tracker: TokenTracker) -> None:
    count = tracker.count_tokens(TokenCountParams(model="mystery-1", text="hello"))
    assert not count.exact and "unknown model" in (count.note or "")
    with pytest.raises(UnknownModelError):
        TokenTracker(strict=True).count_tokens(TokenCountParams(model="mystery-1", text="hello"))


def test_claude_count_is_an_estimate_with_a_calibration(tracker: TokenTracker) -> None:
    count = tracker.count_tokens(
        TokenCountParams(model="claude-sonnet-5", messages=MESSAGES, system="Be brief.")
    )
    assert not count.exact and count.tokenizer.startswith("o200k_base*")
    calibration = tracker.calibration("claude-sonnet-5")
    assert calibration is not None and calibration.samples == 0


async def test_acount_tokens(tracker: TokenTracker) -> None:
    count = await tracker.acount_tokens(
        TokenCountParams(model="gemini-2.5-flash", text="Hello world, how are you?")
    )
    assert (count.input_tokens, count.exact, count.tokenizer) == (7, True, "gemma3")


async def test_exact_counts_from_count_endpoints(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(
        config,
        counters=dataclasses.replace(
            config.counters, exact=dataclasses.replace(config.counters.exact, enabled=True)
        ),
    )
    keys = {"openai": API_KEY, "anthropic": API_KEY, "gemini": API_KEY}
    tracker = TokenTracker(config, api_keys=keys)
    for model, expected in [("gpt-4o", 77), ("claude-sonnet-5", 42), ("gemini-2.5-flash", 33)]:
        count = await tracker.acount_tokens(TokenCountParams(model=model, messages=MESSAGES))
        assert (count.input_tokens, count.exact) == (expected, True), model
    seen = orjson.loads(upstream.seen.body)
    assert seen["generateContentRequest"]["contents"] == MESSAGES
    # Cached: a second identical count makes no request.
    before = upstream.requests
    assert tracker.count_tokens(TokenCountParams(model="gpt-4o", messages=MESSAGES)).input_tokens == 77
    assert upstream.requests == before
    # A failing endpoint falls back to the local count, with the reason.
    no_key = TokenTracker(config, api_keys={"openai": ""})
    fallback = await no_key.acount_tokens(TokenCountParams(model="gpt-4o-mini", messages=MESSAGES))
    assert fallback.exact and "API key" in (fallback.note or "")


# ---- calculate_price ------------------------------------------------------------------------------


def test_calculate_price(tracker: TokenTracker) -> None:
    price = tracker.calculate_price("gpt-4o", input_tokens=1000, output_tokens=200, cache_read_tokens=400)
    assert price is not None
    assert (price.input_cost, price.output_cost, price.total_cost) == (
        Decimal("0.002"),
        Decimal("0.002"),
        Decimal("0.004"),
    )
    assert (price.currency, price.price_source) == ("USD", "genai-prices")
    assert tracker.calculate_price("mystery-1", provider="openai", input_tokens=1) is None
    with pytest.raises(UnknownModelError):
        TokenTracker(strict=True).calculate_price("mystery-1", provider="openai", input_tokens=1)


# ---- track_usage with real SDK objects ------------------------------------------------------------

GPT4O = {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1024, "reasoning_tokens": 128}


def check(metrics: Any, usage_source: str = "provider", **expected: Any) -> None:
    for key, value in expected.items():
        assert getattr(metrics, key) == value, (key, getattr(metrics, key))
    assert metrics.usage_source == usage_source


async def test_track_openai_objects(tracker: TokenTracker, upstream: FakeUpstream) -> None:
    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{upstream.url}/v1")
    started = datetime.now(UTC) - timedelta(seconds=2)
    call = CallParams(model="gpt-4o", messages=MESSAGES, started_at=started, tags={"team": "a"})

    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    metrics = tracker.track_usage(call, completion)
    check(metrics, **GPT4O, endpoint="chat.completions", model="gpt-4o-2024-08-06")
    assert metrics.price is not None and metrics.price.total_cost == Decimal("0.00472")
    assert metrics.duration is not None and metrics.duration >= 2
    assert metrics.token_count == TokenCount(1200, 300, exact=True, tokenizer="provider")
    assert metrics.record.tags == {"team": "a"}
    assert (
        metrics.estimated_input_tokens == 9
    )  # cookbook rule: 3 priming + 3 per message + "user" 1 + "Say hello" 2

    options: Any = {"include_usage": True}
    chunks = [c async for c in await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options=options)]  # fmt: skip
    check(tracker.track_usage(call, chunks), **GPT4O)

    bare = [
        c async for c in await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    ]
    estimated = tracker.track_usage(call, bare)
    check(estimated, "estimated", input_tokens=9, output_tokens=3)  # counted, and flagged
    assert estimated.token_count.exact is False

    response = await client.responses.create(model="gpt-4o", input="Say hello")
    check(tracker.track_usage(call, response), **GPT4O, endpoint="responses")
    events = [e async for e in await client.responses.create(model="gpt-4o", input="Say hello", stream=True)]
    check(tracker.track_usage(call, events), **GPT4O, endpoint="responses")

    embedding = await client.embeddings.create(model="text-embedding-3-small", input="hi")
    check(
        tracker.track_usage(CallParams(model="text-embedding-3-small"), embedding),
        input_tokens=8,
        endpoint="embeddings",
    )


async def test_track_anthropic_objects(tracker: TokenTracker, upstream: FakeUpstream) -> None:
    client = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=upstream.url)
    call = CallParams(model="claude-sonnet-5", messages=MESSAGES)
    expected = {"input_tokens": 12050, "output_tokens": 400, "cache_read_tokens": 10000, "cache_write_tokens": 2000,
                "cache_write_1h_tokens": 500}  # fmt: skip
    message = await client.messages.create(model="claude-sonnet-5", max_tokens=10, messages=MESSAGES)
    metrics = tracker.track_usage(call, message)
    check(metrics, **expected)
    assert metrics.price is not None and metrics.price.input_cost == Decimal("0.00785")
    events = [e async for e in await client.messages.create(
        model="claude-sonnet-5", max_tokens=10, messages=MESSAGES, stream=True)]  # fmt: skip
    check(tracker.track_usage(call, events), **expected)


async def test_track_gemini_objects(tracker: TokenTracker, upstream: FakeUpstream) -> None:
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=upstream.url))
    call = CallParams(model="gemini-2.5-flash", messages=[{"role": "user", "parts": [{"text": "Say hello"}]}])
    expected = {
        "input_tokens": 3000,
        "output_tokens": 750,
        "cache_read_tokens": 2048,
        "reasoning_tokens": 500,
    }
    response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
    check(tracker.track_usage(call, response), **expected, endpoint="generateContent")
    chunks = [
        c
        async for c in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="x")
    ]
    check(tracker.track_usage(call, chunks), **expected, endpoint="streamGenerateContent")
    assert tracker.track_usage(call, chunks).estimated_input_tokens == 2  # Gemma 3: "Say", " hello"


def test_track_dicts_and_json_bytes(tracker: TokenTracker) -> None:
    body = {
        "model": "gpt-4o",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "object": "chat.completion",
    }
    call = CallParams(model="gpt-4o")
    check(tracker.track_usage(call, body), input_tokens=10, output_tokens=5)
    check(tracker.track_usage(call, orjson.dumps(body)), input_tokens=10, output_tokens=5)
    check(tracker.track_usage(call, orjson.dumps(body).decode()), input_tokens=10, output_tokens=5)
    with pytest.raises(TypeError, match="cannot read usage"):
        tracker.track_usage(call, object())


async def test_atrack_usage_and_thread_safety(tracker: TokenTracker) -> None:
    body = {"model": "claude-sonnet-5", "type": "message", "usage": {"input_tokens": 7, "output_tokens": 3}}
    call = CallParams(model="claude-sonnet-5", messages=MESSAGES)
    metrics = await tracker.atrack_usage(call, body)
    check(metrics, input_tokens=7, output_tokens=3)

    texts = [f"text number {i} " * 50 for i in range(40)]
    expected = [tracker.count_tokens(TokenCountParams(model="gpt-4o", text=t)).input_tokens for t in texts]

    def work(i: int) -> tuple[int, int]:
        count = tracker.count_tokens(TokenCountParams(model="gpt-4o", text=texts[i % 40]))
        tracked = tracker.track_usage(call, body)
        return count.input_tokens, tracked.input_tokens

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(400)))
    assert [r[0] for r in results] == [expected[i % 40] for i in range(400)]
    assert {r[1] for r in results} == {7}
    counted = await asyncio.gather(
        *(tracker.acount_tokens(TokenCountParams(model="gpt-4o", text=t)) for t in texts)
    )
    assert [c.input_tokens for c in counted] == expected


def test_from_config(tmp_path: Any) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[pricing.models."gpt-4o"]\ninput = 1\noutput = 1\n')
    tracker = TokenTracker.from_config(path)
    price = tracker.calculate_price("gpt-4o", input_tokens=1_000_000)
    assert price is not None and (price.total_cost, price.price_source) == (Decimal(1), "config")
    assert isinstance(tracker.config, Config)
