"""The official openai SDK through the proxy: every metered endpoint, streamed and not."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY, MakeProxy
from tests.proxy.helpers import assert_usage, only_record

MESSAGES: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
# gpt-4o: $2.50 input, $1.25 cached input, $10 output per 1M. Fake usage: 1200 in (1024 cached), 300 out.
GPT4O = {
    "input_tokens": 1200,
    "output_tokens": 300,
    "cache_read_tokens": 1024,
    "cache_write_tokens": 0,
    "reasoning_tokens": 128,
    "total_tokens": 1500,
    "usage_source": "provider",
    "input_cost": "0.00172",  # 176 * 2.5 + 1024 * 1.25 = 1720 µ$
    "output_cost": "0.003",
    "total_cost": "0.00472",
    "price_source": "genai-prices",
    "model": "gpt-4o-2024-08-06",
    "request_model": "gpt-4o",
    "status": 200,
    "platform": "direct",
}


def clients(proxy: RunningProxy, upstream: FakeUpstream) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    via = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    direct = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{upstream.url}/v1", max_retries=0)
    return via, direct


async def test_chat_completion(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via, direct = clients(proxy, upstream)
    raw = await via.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    direct_raw = await direct.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.http_response.content == direct_raw.http_response.content
    assert raw.parse().choices[0].message.content == "Hello from the"
    record = await only_record(proxy)
    assert_usage(record, provider="openai", endpoint="chat.completions", stream=False, **GPT4O)
    assert record["upstream_request_id"] == "req_fake_openai_0001"
    assert record["estimated_input_tokens"] is None  # provider usage only, unless estimate_input is on


async def test_estimate_input_counts_the_request_beside_provider_usage(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(estimate_input=True)
    via, _ = clients(proxy, upstream)
    await via.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    record = await only_record(proxy)
    assert_usage(record, provider="openai", endpoint="chat.completions", stream=False, **GPT4O)
    # o200k_base: "Be brief." 3 + "Say hello" 2 + the roles 1 + 1, 3 per message, 3 to prime the reply.
    assert record["estimated_input_tokens"] == 16


async def test_chat_stream_injects_usage_and_hides_it(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via, direct = clients(proxy, upstream)
    async with via.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True
    ) as response:
        proxied = b"".join([chunk async for chunk in response.iter_bytes()])
    # What the proxy sent upstream asked for usage...
    assert b'"stream_options":{"include_usage":true}' in upstream.seen.body
    async with direct.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True
    ) as response:
        plain = b"".join([chunk async for chunk in response.iter_bytes()])
    # ...but the client gets exactly the stream it asked for: no usage chunk, no "usage": null.
    assert b"usage" not in plain
    assert proxied == plain
    record = await only_record(proxy)
    assert_usage(record, endpoint="chat.completions", stream=True, **GPT4O)


async def test_chat_stream_sdk_parses_the_edited_stream(proxy: RunningProxy) -> None:
    via = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    stream = await via.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the"
    assert_usage(await only_record(proxy), **GPT4O)


async def test_chat_stream_client_asked_for_usage(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via, direct = clients(proxy, upstream)
    options: Any = {"include_usage": True}
    kwargs: Any = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": options}
    async with via.chat.completions.with_streaming_response.create(**kwargs) as response:
        proxied = b"".join([chunk async for chunk in response.iter_bytes()])
    async with direct.chat.completions.with_streaming_response.create(**kwargs) as response:
        plain = b"".join([chunk async for chunk in response.iter_bytes()])
    assert proxied == plain
    assert b'"usage":{"prompt_tokens":1200' in proxied  # the client's own usage chunk is kept
    assert_usage(await only_record(proxy), stream=True, **GPT4O)


async def test_injection_can_be_turned_off(make_proxy: Any, upstream: FakeUpstream) -> None:
    proxy = await make_proxy(inject_stream_usage=False)
    via = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    stream = await via.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from the"
    assert b"stream_options" not in upstream.seen.body
    record = await only_record(proxy)
    # No usage came back, so the record is an estimate, and says so.
    assert record["usage_source"] == "estimated"
    assert record["output_tokens"] == 3  # "Hello from the" in o200k_base
    assert record["input_tokens"] == record["estimated_input_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_responses(proxy: RunningProxy, upstream: FakeUpstream, stream: bool) -> None:
    via, direct = clients(proxy, upstream)
    if stream:
        async with via.responses.with_streaming_response.create(
            model="gpt-4o", input="Say hello", stream=True
        ) as response:
            proxied = b"".join([chunk async for chunk in response.iter_bytes()])
        async with direct.responses.with_streaming_response.create(
            model="gpt-4o", input="Say hello", stream=True
        ) as response:
            plain = b"".join([chunk async for chunk in response.iter_bytes()])
        assert proxied == plain
        events = [e async for e in await via.responses.create(model="gpt-4o", input="Say hello", stream=True)]
        assert events[-1].type == "response.completed"
        records = list(await proxy.flush())
        assert len(records) == 2
        proxy.records.clear()
        record = records[0]
    else:
        response = await via.responses.create(model="gpt-4o", input="Say hello")
        assert response.output_text == "Hello from the"
        record = await only_record(proxy)
    assert_usage(record, endpoint="responses", stream=stream, **GPT4O)


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_completions(proxy: RunningProxy, upstream: FakeUpstream, stream: bool) -> None:
    via, _ = clients(proxy, upstream)
    if stream:
        result = await via.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", stream=True)
        text = "".join([c.choices[0].text async for c in result if c.choices])
    else:
        completion = await via.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
        text = completion.choices[0].text
    assert text == "Hello from the"
    # gpt-3.5-turbo-instruct: $1.50 input, $2.00 output per 1M.
    assert_usage(
        await only_record(proxy),
        endpoint="completions",
        stream=stream,
        input_tokens=50,
        output_tokens=16,
        usage_source="provider",
        input_cost="0.000075",
        output_cost="0.000032",
    )


async def test_embeddings(proxy: RunningProxy, upstream: FakeUpstream) -> None:
    via, direct = clients(proxy, upstream)
    raw = await via.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"])
    direct_raw = await direct.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["a", "b"]
    )
    assert raw.http_response.content == direct_raw.http_response.content
    assert raw.parse().data[1].embedding == [0.25, -0.5, 0.125, 1.0]
    assert_usage(
        await only_record(proxy),
        endpoint="embeddings",
        input_tokens=8,
        output_tokens=0,
        total_tokens=8,
        input_cost="0.00000016",  # $0.02 per 1M
        output_cost="0",
    )


async def test_unmetered_path_passes_through_without_record(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    via, _ = clients(proxy, upstream)
    models = await via.models.list()
    assert [m.id async for m in models] == ["gpt-4o"]
    assert upstream.seen.path_qs == "/v1/models"
    await proxy.flush()
    assert proxy.records == []


async def test_api_key_never_in_record(proxy: RunningProxy) -> None:
    via = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    await via.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    from llmtally.pipeline import render_records

    lines = render_records(await proxy.flush())
    assert API_KEY.encode() not in lines
    assert b"SECRET" not in lines
