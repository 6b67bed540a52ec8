"""Vertex AI through the proxy with the official clients: google-genai (``vertexai=True``) for Gemini and
``anthropic.AsyncAnthropicVertex`` for Claude."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from google import genai
from google.genai import types
from google.oauth2.credentials import Credentials

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.proxy.helpers import assert_usage, only_record, raw_exchange, status_of

TOKEN = "ya29.llmtally-test-token"
PROJECT = "proj-1"
REGION = "us-central1"
USAGE_FLASH = {
    "input_tokens": 3000,
    "output_tokens": 750,
    "cache_read_tokens": 2048,
    "reasoning_tokens": 500,
    "usage_source": "provider",
    "model": "gemini-2.5-flash",
    "request_model": "gemini-2.5-flash",
    "platform": "vertex",
    # Google's Vertex prices for gemini-2.5-flash: $0.30 input, $0.03 cached, $2.50 output per 1M.
    "input_cost": "0.00034704",  # 952 * 0.30 + 2048 * 0.03 = 347.04 µ$
    "output_cost": "0.001875",  # 750 * 2.50 (thinking included)
    "total_cost": "0.00222204",
    "price_source": "genai-prices",
}
USAGE_CLAUDE = {
    "input_tokens": 12050,
    "output_tokens": 400,
    "cache_read_tokens": 10000,
    "cache_write_tokens": 2000,
    "usage_source": "provider",
    "model": "claude-sonnet-4-5-20250929",
    "request_model": "claude-sonnet-4-5@20250929",
    "platform": "vertex",
    # Google's Vertex prices for Claude Sonnet 4.5: $3 input, $0.30 cache read, $3.75 5-minute write,
    # $6 1-hour write, $15 output per 1M; the fake writes 1500 (5m) + 500 (1h).
    "input_cost": "0.011775",  # 50 * 3 + 10000 * 0.3 + 1500 * 3.75 + 500 * 6 = 11775 µ$
    "output_cost": "0.006",
    "total_cost": "0.017775",
    "price_source": "genai-prices",
    "priced_model": "claude-sonnet-4-5",
}


def gemini_client(base: str) -> genai.Client:
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=REGION,
        credentials=Credentials(token=TOKEN),
        http_options=types.HttpOptions(base_url=base),
    )


def claude_client(base: str) -> anthropic.AsyncAnthropicVertex:
    return anthropic.AsyncAnthropicVertex(
        region="us-east5", project_id=PROJECT, access_token=TOKEN, base_url=base, max_retries=0
    )


async def test_gemini_generate_content(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via = await gemini_client(f"{proxy.url}/vertex").aio.models.generate_content(
        model="gemini-2.5-flash", contents="hi"
    )
    direct = await gemini_client(upstream.url).aio.models.generate_content(
        model="gemini-2.5-flash", contents="hi"
    )
    assert via.text == direct.text == "Hello from Vertex!"
    assert upstream.seen.path_qs.startswith(
        f"/v1beta1/projects/{PROJECT}/locations/{REGION}/publishers/google/"
    )
    assert upstream.seen.headers["Authorization"] == f"Bearer {TOKEN}"
    record = await only_record(proxy)
    assert_usage(record, provider="gemini", endpoint="generateContent", stream=False, **USAGE_FLASH)
    assert record["status"] == 200


async def test_provisioned_throughput_is_recorded_at_the_on_demand_equivalent_with_a_note(
    proxy: RunningProxy,
) -> None:
    dedicated = types.HttpOptions(
        base_url=f"{proxy.url}/vertex", headers={"X-Vertex-AI-LLM-Request-Type": "dedicated"}
    )
    client = genai.Client(
        vertexai=True, project=PROJECT, location=REGION, credentials=Credentials(token=TOKEN),
        http_options=dedicated,
    )  # fmt: skip
    await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    record = await only_record(proxy)
    assert_usage(record, **USAGE_FLASH)  # the tokens as ever, priced as on-demand
    assert record["service_tier"] == "provisioned_throughput"
    assert record["pricing_note"] == (
        "provisioned_throughput: prepaid capacity, not billed per token; cost is the on-demand equivalent"
    )


async def test_gemini_stream_is_sse(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    client = gemini_client(f"{proxy.url}/vertex")
    chunks = [
        c
        async for c in await client.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="hi"
        )
    ]
    assert "".join(c.text or "" for c in chunks) == "Hello from Vertex!"
    assert upstream.seen.path_qs.endswith(":streamGenerateContent?alt=sse")
    record = await only_record(proxy)
    assert_usage(record, provider="gemini", endpoint="streamGenerateContent", stream=True, **USAGE_FLASH)


async def test_count_tokens_is_forwarded_unmetered(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    path = f"/vertex/v1beta1/projects/{PROJECT}/locations/{REGION}/publishers/google/models/gemini-2.5-flash:countTokens"
    answer = await raw_exchange(
        proxy.url,
        f"POST {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
    )
    assert status_of(answer) == 200 and b'"totalTokens": 33' in answer
    assert upstream.seen.path_qs.endswith(":countTokens") and await proxy.flush() == []


async def test_claude_raw_predict(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    client = claude_client(f"{proxy.url}/vertex/v1")
    message = await client.messages.create(
        model="claude-sonnet-4-5@20250929", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    assert (
        upstream.seen.path_qs
        == f"/v1/projects/{PROJECT}/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    )
    record = await only_record(proxy)
    assert_usage(record, provider="anthropic", endpoint="messages", stream=False, **USAGE_CLAUDE)


async def test_claude_stream_raw_predict(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    client = claude_client(f"{proxy.url}/vertex/v1")
    kwargs: Any = {
        "model": "claude-sonnet-4-5@20250929",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with client.messages.stream(**kwargs) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == "Hello from the"
    assert upstream.seen.path_qs.endswith(":streamRawPredict")
    record = await only_record(proxy)
    assert_usage(record, provider="anthropic", endpoint="messages", stream=True, **USAGE_CLAUDE)


@pytest.mark.parametrize("location", ["evil.example.com", "us-central1.evil", "x%2Fy", "US-CENTRAL1"])
async def test_a_location_that_is_not_a_region_is_refused(proxy: RunningProxy, location: str) -> None:
    path = f"/vertex/v1/projects/p/locations/{location}/publishers/google/models/gemini-2.5-flash:generateContent"
    answer = await raw_exchange(
        proxy.url, f"POST {path} HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    assert status_of(answer) == 400
