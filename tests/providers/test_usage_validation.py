"""Usage numbers that are not token counts are never taken as they came (issue 26: a hostile or
broken upstream must not bill 10^30 tokens, nor break a sink with a number it cannot hold)."""

from __future__ import annotations

import json

import orjson
import pytest

from llmtally.providers import ADAPTERS, Endpoint, MeteredRequest
from llmtally.providers.base import MAX_TOKEN_COUNT, InvalidUsage, as_int

ABSURD = [10**30, 2**64 + 5, MAX_TOKEN_COUNT, -5, 1.5, "7", [3], True, {"n": 1}]


@pytest.mark.parametrize("value", ABSURD, ids=repr)
def test_as_int_refuses_what_is_not_a_token_count(value: object) -> None:
    with pytest.raises(InvalidUsage):
        as_int(value)


@pytest.mark.parametrize("value", [None, 0, 7, 7.0, MAX_TOKEN_COUNT - 1])
def test_as_int_takes_token_counts(value: object) -> None:
    assert as_int(value) == int(value or 0)  # type: ignore[call-overload]


def _body(provider: str, value: object) -> tuple[MeteredRequest, bytes]:
    """A response whose one usage field holds ``value``, written as JSON text (orjson cannot write
    integers past 64 bits, which is just what an upstream may send)."""
    if provider == "openai":
        endpoint = Endpoint("openai", "chat.completions")
        body = {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": "@", "completion_tokens": 3}}
    elif provider == "anthropic":
        endpoint = Endpoint("anthropic", "messages")
        body = {
            "type": "message",
            "model": "claude-sonnet-4-5",
            "usage": {"input_tokens": 3, "output_tokens": "@"},
        }
    else:
        endpoint = Endpoint("gemini", "generateContent", url_model="gemini-2.5-flash")
        body = {"candidates": [], "usageMetadata": {"promptTokenCount": 3, "thoughtsTokenCount": "@"}}
    request = MeteredRequest(endpoint, b"{}", None, False, {})
    return request, orjson.dumps(body).replace(b'"@"', json.dumps(value).encode())


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("value", [10**30, -5, 1.5, "7"], ids=repr)
def test_every_provider_flags_absurd_usage(provider: str, value: object) -> None:
    request, body = _body(provider, value)
    summary = ADAPTERS[provider].parse_response(request, body)  # type: ignore[index]
    assert summary.usage is None
    assert summary.usage_error is not None and "token count" in summary.usage_error
