"""Each provider's usage normalisation, including the streaming accumulation rules."""

from __future__ import annotations

import orjson

from llmtally.providers import ADAPTERS
from llmtally.providers.anthropic import usage_from_anthropic
from llmtally.providers.gemini import usage_from_gemini
from llmtally.providers.openai import usage_from_openai
from llmtally.record import TokenUsage


def test_openai_prompt_tokens_already_include_cached() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 60},
            "completion_tokens_details": {"reasoning_tokens": 20},
        }
    )
    assert usage == TokenUsage(100, 50, cache_read_tokens=60, reasoning_tokens=20)


def test_openai_responses_shape() -> None:
    usage = usage_from_openai(
        {"input_tokens": 10, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2}}
    )
    assert usage == TokenUsage(10, 5, reasoning_tokens=2)


def test_anthropic_input_adds_cache_reads_and_writes() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 5,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "output_tokens": 7,
        }
    )
    assert usage == TokenUsage(
        1305, 7, cache_read_tokens=1000, cache_write_tokens=300, cache_write_1h_tokens=200
    )


def sse(*events: dict[str, object]) -> bytes:
    return b"".join(b"event: x\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


def test_anthropic_stream_delta_usage_is_cumulative_not_added() -> None:
    adapter = ADAPTERS["anthropic"]
    endpoint = adapter.route("v1/messages")
    assert endpoint is not None
    request = adapter.prepare(endpoint, b'{"model":"claude-sonnet-5","stream":true}', {}, True)
    parser = adapter.stream_parser(request)
    start_usage = {"input_tokens": 10, "cache_read_input_tokens": 500, "output_tokens": 1}
    parser.feed(sse({"type": "message_start", "message": {"model": "claude-sonnet-5", "usage": start_usage}}))
    # Two deltas, each cumulative and repeating the input side.
    parser.feed(sse({"type": "message_delta", "usage": {"output_tokens": 40, "input_tokens": 10}}))
    parser.feed(
        sse({"type": "message_delta", "usage": {"output_tokens": 90, "cache_read_input_tokens": 500}})
    )
    parser.feed(sse({"type": "message_stop"}))
    summary = parser.finish()
    assert summary.usage == TokenUsage(510, 90, cache_read_tokens=500)
    assert summary.complete


def test_gemini_output_includes_thoughts_and_tool_use_is_input() -> None:
    usage = usage_from_gemini(
        {
            "promptTokenCount": 100,
            "cachedContentTokenCount": 40,
            "candidatesTokenCount": 30,
            "thoughtsTokenCount": 70,
            "toolUsePromptTokenCount": 25,
        }
    )
    assert usage == TokenUsage(125, 100, cache_read_tokens=40, reasoning_tokens=70)


def test_gemini_stream_last_usage_wins() -> None:
    adapter = ADAPTERS["gemini"]
    endpoint = adapter.route("v1beta/models/gemini-2.5-flash:streamGenerateContent")
    assert endpoint is not None and endpoint.url_model == "gemini-2.5-flash"
    request = adapter.prepare(endpoint, b"{}", {"alt": "sse"}, True)
    parser = adapter.stream_parser(request)
    for n in (10, 20, 30):
        chunk = {"usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": n}, "modelVersion": "m"}
        parser.feed(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
    summary = parser.finish()
    assert summary.usage == TokenUsage(100, 30, reasoning_tokens=0)


def test_gemini_routes() -> None:
    adapter = ADAPTERS["gemini"]
    for path in (
        "v1/models/gemini-2.5-pro:generateContent",
        "v1beta/models/gemini-embedding-001:batchEmbedContents",
        "v1beta/tunedModels/my-tune:generateContent",
    ):
        assert adapter.route(path) is not None, path
    for path in ("v1beta/models", "v1beta/models/gemini-2.5-pro:countTokens", "v1beta/files"):
        assert adapter.route(path) is None, path


def test_openai_injection_edits_bytes_not_json() -> None:
    adapter = ADAPTERS["openai"]
    endpoint = adapter.route("v1/chat/completions")
    assert endpoint is not None
    body = b'{"model": "gpt-4o",  "stream": true, "messages": []}'
    request = adapter.prepare(endpoint, body, {}, True)
    assert request.injected_usage
    assert (
        request.body
        == b'{"stream_options":{"include_usage":true},"model": "gpt-4o",  "stream": true, "messages": []}'
    )
    # Existing options are kept and merged.
    body = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_obfuscation":false}}'
    merged = orjson.loads(adapter.prepare(endpoint, body, {}, True).body)
    assert merged["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    # Not for non-streaming calls, nor when the client asked already.
    assert not adapter.prepare(endpoint, b'{"model":"gpt-4o"}', {}, True).injected_usage
    asked = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}'
    assert not adapter.prepare(endpoint, asked, {}, True).injected_usage
