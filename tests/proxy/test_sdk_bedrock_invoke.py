"""InvokeModel of models that are not Claude (Llama, Nova, Titan) and of application inference
profiles, through the proxy with boto3: metered from Bedrock's own counts (the count headers, the
stream's invocation metrics), priced with genai-prices' Bedrock data."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from llmtally.testing import FakeUpstream
from llmtally.testing.fake_bedrock import (
    ACCESS_KEY,
    APP_PROFILE_ID,
    NATIVE_INPUT,
    NATIVE_OUTPUT,
    SECRET_KEY,
)
from llmtally.testing.harness import RunningProxy
from tests.conftest import MakeProxy
from tests.proxy.helpers import assert_usage, only_record
from tests.proxy.test_sdk_bedrock import US_SONNET, US_USAGE, _config, runtime
from tests.proxy.test_sdk_bedrock import bedrock_proxy as bedrock_proxy  # the fixture, both front ends

LLAMA = "us.meta.llama3-3-70b-instruct-v1:0"
NOVA = "us.amazon.nova-pro-v1:0"
TITAN = "amazon.titan-text-express-v1"
BODIES: dict[str, dict[str, Any]] = {
    LLAMA: {"prompt": "<|begin_of_text|>Say hi.", "max_gen_len": 64, "temperature": 0.2},
    NOVA: {
        "schemaVersion": "messages-v1",
        "messages": [{"role": "user", "content": [{"text": "Say hi."}]}],
        "inferenceConfig": {"maxTokens": 64},
    },
    TITAN: {"inputText": "Say hi.", "textGenerationConfig": {"maxTokenCount": 64}},
}
APP_PROFILE = f"arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/{APP_PROFILE_ID}"


def _cost(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    """genai-prices' own answer for Bedrock (the oracle the records are checked against)."""
    price = calc_price(
        Usage(input_tokens=input_tokens, output_tokens=output_tokens), model, provider_id="aws"
    )
    return Decimal(price.total_price)


def _invoke(client: Any, model: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.invoke_model(modelId=model, body=json.dumps(body), contentType="application/json")
    return {"body": json.loads(answer["body"].read()), "headers": answer["ResponseMetadata"]["HTTPHeaders"]}


def _invoke_stream(client: Any, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    answer = client.invoke_model_with_response_stream(modelId=model, body=json.dumps(body))
    return [json.loads(event["chunk"]["bytes"]) for event in answer["body"]]


def _native(model: str, stream: bool) -> dict[str, Any]:
    return {
        "provider": "invoke",
        "platform": "bedrock",
        "endpoint": "invoke-with-response-stream" if stream else "invoke",
        "stream": stream,
        "status": 200,
        "input_tokens": NATIVE_INPUT,
        "output_tokens": NATIVE_OUTPUT,
        "usage_source": "provider",
        "request_model": model,
        "model": model,
        "price_source": "genai-prices",
        "total_cost": str(_cost(model, NATIVE_INPUT, NATIVE_OUTPUT)),
    }


@pytest.mark.parametrize("model", [LLAMA, NOVA, TITAN])
async def test_invoke_model_of_other_vendors_is_metered_from_the_count_headers(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream, model: str
) -> None:
    via = await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), model, BODIES[model])
    direct = await asyncio.to_thread(_invoke, runtime(upstream.url), model, BODIES[model])
    assert via["body"] == direct["body"]
    assert via["headers"]["x-amzn-bedrock-input-token-count"] == str(NATIVE_INPUT)
    record = await only_record(bedrock_proxy)
    assert_usage(record, **_native(model, stream=False))
    assert record["total_cost"] is not None and Decimal(record["total_cost"]) > 0
    assert record["error"] is None and record["upstream_request_id"].endswith("llmtally0003")


@pytest.mark.parametrize("model", [LLAMA, NOVA, TITAN])
async def test_their_response_streams_pass_as_sent_and_are_metered_from_the_invocation_metrics(
    bedrock_proxy: RunningProxy, upstream: FakeUpstream, model: str
) -> None:
    via = await asyncio.to_thread(
        _invoke_stream, runtime(f"{bedrock_proxy.url}/bedrock"), model, BODIES[model]
    )
    direct = await asyncio.to_thread(_invoke_stream, runtime(upstream.url), model, BODIES[model])
    assert via == direct and "amazon-bedrock-invocationMetrics" in via[-1]
    record = await only_record(bedrock_proxy)
    assert_usage(record, **_native(model, stream=True))


async def test_without_count_headers_the_vendors_own_body_counts_are_read(
    bedrock_proxy: RunningProxy,
) -> None:
    model = "meta.llama3-3-70b-instruct-nousage-v1:0"  # the fake leaves Bedrock's headers out
    answer = await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), model, BODIES[LLAMA])
    assert "x-amzn-bedrock-input-token-count" not in answer["headers"]
    record = await only_record(bedrock_proxy)
    assert_usage(record, input_tokens=NATIVE_INPUT, output_tokens=NATIVE_OUTPUT, usage_source="provider")


async def test_a_stream_without_metrics_is_estimated_from_the_prompt_and_says_so(
    bedrock_proxy: RunningProxy,
) -> None:
    model = "meta.llama3-3-70b-instruct-nousage-v1:0"
    body = {"prompt": "Count these words please " * 20, "max_gen_len": 64}
    events = await asyncio.to_thread(_invoke_stream, runtime(f"{bedrock_proxy.url}/bedrock"), model, body)
    assert "amazon-bedrock-invocationMetrics" not in events[-1]
    record = await only_record(bedrock_proxy)
    assert record["usage_source"] == "estimated" and record["provider"] == "invoke"
    assert 80 <= record["input_tokens"] <= 140, record  # ~100 words of prompt
    assert record["output_tokens"] > 0  # from the generated text the stream carried


async def test_an_application_inference_profile_is_priced_by_the_model_configured_for_it(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, upstream: FakeUpstream
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    config = _config("resign")
    config = dataclasses.replace(
        config, bedrock=dataclasses.replace(config.bedrock, inference_profiles={APP_PROFILE_ID: US_SONNET})
    )
    proxy = await make_proxy(config)
    claude_body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }
    await asyncio.to_thread(_invoke, runtime(f"{proxy.url}/bedrock"), APP_PROFILE, claude_body)
    assert upstream.seen.path_qs.startswith("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3A")
    record = await only_record(proxy)
    assert_usage(record, stream=False, status=200, **US_USAGE)


async def test_an_unmapped_application_inference_profile_is_metered_unpriced_with_a_note(
    bedrock_proxy: RunningProxy,
) -> None:
    claude_body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }
    await asyncio.to_thread(_invoke, runtime(f"{bedrock_proxy.url}/bedrock"), APP_PROFILE, claude_body)
    record = await only_record(bedrock_proxy)
    # Bedrock's headers: 50 uncached + 10000 cache read + 2000 cache write in, 400 out.
    assert_usage(
        record,
        provider="invoke",
        input_tokens=12050,
        cache_read_tokens=10000,
        cache_write_tokens=2000,
        output_tokens=400,
        usage_source="provider",
        request_model=APP_PROFILE,
        total_cost=None,
    )
    assert "[bedrock.inference_profiles]" in record["pricing_note"]
