"""Inputs the fuzzers found (tests/providers/test_fuzz_*.py), kept as fixed cases."""

from __future__ import annotations

import pytest

from llmtally.providers import ADAPTERS, ResponseSummary
from llmtally.record import Provider

_STREAMS: dict[str, tuple[Provider, str, dict[str, str]]] = {
    "gemini-sse": ("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent", {"alt": "sse"}),
    "gemini-array": ("gemini", "v1beta/models/gemini-2.5-flash:streamGenerateContent", {}),
    "openai-chat": ("openai", "v1/chat/completions", {}),
}


def parse(kind: str, data: bytes) -> ResponseSummary:
    provider, path, query = _STREAMS[kind]
    adapter = ADAPTERS[provider]
    endpoint = adapter.route(path)
    assert endpoint is not None
    parser = adapter.stream_parser(adapter.prepare(endpoint, b'{"stream":true}', query, False))
    parser.feed(data)
    return parser.finish()


#: A list field holding a number or ``true`` raised TypeError out of the stream parser: the proxy
#: logged a traceback and the call's record lost the usage the same event carried.
NOT_A_LIST = [
    ("gemini-sse", b'data: {"candidates": true, "usageMetadata": {"promptTokenCount": 3}}\n\n'),
    ("gemini-array", b'[{"candidates": 7, "usageMetadata": {"promptTokenCount": 3}}]'),
    (
        "gemini-sse",
        b'data: {"candidates": [{"content": {"parts": 1}}], "usageMetadata": {"promptTokenCount": 3}}\n\n',
    ),
    ("openai-chat", b'data: {"usage": {"prompt_tokens": 3}, "choices": 1}\n\n'),
    (
        "openai-chat",
        b'data: {"usage": {"prompt_tokens": 3}, "choices": [{"delta": {"tool_calls": 2.5}}]}\n\n',
    ),
]


@pytest.mark.parametrize(("kind", "data"), NOT_A_LIST)
def test_a_list_field_that_is_not_a_list_is_ignored_and_usage_kept(kind: str, data: bytes) -> None:
    summary = parse(kind, data)
    assert summary.usage is not None
    assert summary.usage.input_tokens == 3
