"""The official google-genai SDK through the proxy, plus the endpoints and stream forms it does not use."""

from __future__ import annotations

import aiohttp
import pytest
from google import genai
from google.genai import types

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY
from tests.proxy.helpers import assert_usage, only_record, replay

# gemini-2.5-flash: $0.30 input, $0.03 cached input, $2.50 output (thinking included) per 1M.
# Fake usage: prompt 3000 (2048 cached), candidates 250, thoughts 500.
FLASH = {
    "input_tokens": 3000,
    "output_tokens": 750,  # candidates + thoughts
    "cache_read_tokens": 2048,
    "reasoning_tokens": 500,
    "total_tokens": 3750,
    "usage_source": "provider",
    "input_cost": "0.00034704",  # 952 * 0.3 + 2048 * 0.03 = 347.04 µ$
    "output_cost": "0.001875",
    "model": "gemini-2.5-flash",
    "request_model": "gemini-2.5-flash",
}


def client(base: str, api_version: str | None = None) -> genai.Client:
    return genai.Client(
        api_key=API_KEY, http_options=types.HttpOptions(base_url=base, api_version=api_version)
    )


@pytest.mark.parametrize("api_version", [None, "v1beta"])
async def test_generate_content(proxy: RunningProxy, upstream: FakeUpstream, api_version: str | None) -> None:
    response = await client(f"{proxy.url}/gemini", api_version).aio.models.generate_content(
        model="gemini-2.5-flash", contents="Say hello"
    )
    assert response.text == "Hello from the"
    assert upstream.seen.path_qs.startswith(f"/{api_version or 'v1'}/models/gemini-2.5-flash:generateContent")
    assert upstream.seen.headers["x-goog-api-key"] == API_KEY
    record = await only_record(proxy)
    assert_usage(record, provider="gemini", endpoint="generateContent", stream=False, **FLASH)
    direct, proxied = await replay(proxy, upstream, "gemini")
    assert proxied == direct


@pytest.mark.parametrize("api_version", [None, "v1beta"])
async def test_stream_sse(proxy: RunningProxy, upstream: FakeUpstream, api_version: str | None) -> None:
    stream = await client(f"{proxy.url}/gemini", api_version).aio.models.generate_content_stream(
        model="gemini-2.5-flash", contents="Say hello"
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.text or "" for c in chunks) == "Hello from the"
    assert "alt=sse" in upstream.seen.path_qs
    # Every chunk carries cumulative usageMetadata; the last one wins (never the sum).
    assert_usage(await only_record(proxy), endpoint="streamGenerateContent", stream=True, **FLASH)
    direct, proxied = await replay(proxy, upstream, "gemini")
    assert proxied == direct
    assert direct.count(b"\r\n\r\n") == 3


async def test_stream_json_array(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    """The default (non-SSE) stream: one JSON array written element by element."""
    url = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    body = b'{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}'
    headers = {"x-goog-api-key": API_KEY, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/gemini" + url, data=body, headers=headers) as response:
            proxied = await response.read()
        async with session.post(upstream.url + url, data=body, headers=headers) as response:
            direct = await response.read()
    assert proxied == direct
    assert proxied.startswith(b"[{") and proxied.endswith(b"}]")
    assert_usage(await only_record(proxy), endpoint="streamGenerateContent", stream=True, **FLASH)


async def test_embed_content_via_sdk(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    result = await client(f"{proxy.url}/gemini").aio.models.embed_content(
        model="gemini-embedding-001", contents=["one", "two"]
    )
    assert result.embeddings is not None and len(result.embeddings) == 2
    assert ":batchEmbedContents" in upstream.seen.path_qs
    assert_usage(
        await only_record(proxy),
        endpoint="batchEmbedContents",
        input_tokens=9,
        output_tokens=0,
        usage_source="provider",
        input_cost="0.00000135",  # $0.15 per 1M
        output_cost="0",
    )


async def test_embed_content_without_usage_is_estimated(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    url = "/v1beta/models/gemini-embedding-001:embedContent"
    body = b'{"content":{"parts":[{"text":"hello world"}]}}'
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/gemini" + url, data=body, headers={"x-goog-api-key": API_KEY}) as response,
    ):
        assert response.status == 200
        assert (await response.json())["embedding"]["values"][0] == 0.25
    record = await only_record(proxy)
    assert record["endpoint"] == "embedContent"
    assert record["usage_source"] == "estimated"
    assert record["input_tokens"] == record["estimated_input_tokens"] > 0
    assert record["output_tokens"] == 0
    assert record["total_cost"] is not None
