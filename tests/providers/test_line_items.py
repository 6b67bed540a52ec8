"""Billed units beyond tokens, as each dialect reports them: Anthropic server tools, OpenAI Responses
hosted tools, Gemini grounding (per grounded prompt before Gemini 3, per search query from it)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llmtally.providers import ADAPTERS
from llmtally.providers.base import ResponseSummary
from tests.providers.test_streams import cut


def _parse(provider: str, path: str, body: Any, stream_events: list[bytes] | None = None) -> ResponseSummary:
    adapter = ADAPTERS[provider]  # type: ignore[index]
    endpoint = adapter.route(path)
    assert endpoint is not None
    request = adapter.prepare(
        endpoint, b'{"model":"m","stream":%s}' % (b"true" if stream_events else b"false"), {}, False
    )
    if stream_events is None:
        return adapter.parse_response(request, orjson.dumps(body))
    parser = adapter.stream_parser(request)
    data = b"".join(stream_events)
    for piece in cut(data, [7, 50, 130]):
        parser.feed(piece)
    return parser.finish()


def test_anthropic_server_tools_in_a_body_and_in_a_stream() -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 5,
        "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 1},
    }
    body = {"type": "message", "model": "claude-sonnet-4-5", "usage": usage}
    assert _parse("anthropic", "v1/messages", body).line_items == {"web_search": 3, "web_fetch": 1}
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":5,"server_tool_use":{"web_search_requests":2}}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    assert _parse("anthropic", "v1/messages", None, events).line_items == {"web_search": 2}


@pytest.mark.parametrize("bad", [-1, True, 2.5, "3", None, 2**60])
def test_a_count_that_is_not_a_count_is_not_billed(bad: Any) -> None:
    body = {
        "type": "message",
        "usage": {"input_tokens": 1, "output_tokens": 1, "server_tool_use": {"web_search_requests": bad}},
    }
    assert _parse("anthropic", "v1/messages", body).line_items == {}


def test_openai_responses_hosted_tool_calls() -> None:
    output = [{"type": "web_search_call", "status": "completed"}, {"type": "web_search_call"},
              {"type": "file_search_call"}, {"type": "message"}, "junk"]  # fmt: skip
    body = {"model": "gpt-5", "output": output, "usage": {"input_tokens": 1, "output_tokens": 1}}
    assert _parse("openai", "v1/responses", body).line_items == {"web_search": 2, "file_search": 1}
    completed = {"type": "response.completed", "response": body}
    events = [
        b'data: {"type":"response.output_text.delta","delta":"hi"}\n\n',
        b"data: " + orjson.dumps(completed) + b"\n\n",
    ]
    assert _parse("openai", "v1/responses", None, events).line_items == {"web_search": 2, "file_search": 1}


def _gemini(model: str, queries: list[str]) -> dict[str, Any]:
    grounding = {"webSearchQueries": queries, "groundingChunks": [{"web": {"uri": "https://example.com"}}]}
    return {
        "modelVersion": model,
        "candidates": [
            {"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP", "groundingMetadata": grounding}
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2},
    }


def test_gemini_2_bills_per_grounded_prompt_and_gemini_3_per_query() -> None:
    path = "v1beta/models/m:generateContent"
    assert _parse("gemini", path, _gemini("gemini-2.5-flash", ["a", "b"])).line_items == {
        "grounded_prompt": 1
    }
    assert _parse("gemini", path, _gemini("gemini-3-pro-preview", ["a", "b", "a"])).line_items == {
        "web_search_query": 2
    }
    plain = {
        "modelVersion": "gemini-2.5-flash",
        "candidates": [{"finishReason": "STOP"}],
        "usageMetadata": {},
    }
    assert _parse("gemini", path, plain).line_items == {}
