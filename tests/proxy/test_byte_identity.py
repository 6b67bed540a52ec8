"""Every metered endpoint × streamed and not: the client gets the upstream's exact bytes, one record each."""

from __future__ import annotations

import aiohttp
import pytest

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY
from tests.proxy.helpers import only_record

OPENAI = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
ANTHROPIC = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
GEMINI = {"x-goog-api-key": API_KEY, "Content-Type": "application/json"}
GEMINI_BODY = b'{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'

CASES = [
    # (prefix, path, headers, body, endpoint, stream)
    ("openai", "/v1/chat/completions", OPENAI,
     b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true},'
     b'"stream":true}', "chat.completions", True),
    ("openai", "/v1/chat/completions", OPENAI, b'{"model":"gpt-4o","messages":[]}', "chat.completions", False),
    ("openai", "/v1/responses", OPENAI, b'{"model":"gpt-4o","input":"hi","stream":true}', "responses", True),
    ("openai", "/v1/responses", OPENAI, b'{"model":"gpt-4o","input":"hi"}', "responses", False),
    ("openai", "/v1/completions", OPENAI,
     b'{"model":"gpt-3.5-turbo-instruct","prompt":"hi","stream":true,"stream_options":{"include_usage":true}}',
     "completions", True),
    ("openai", "/v1/completions", OPENAI, b'{"model":"gpt-3.5-turbo-instruct","prompt":"hi"}', "completions", False),
    ("openai", "/v1/embeddings", OPENAI, b'{"model":"text-embedding-3-small","input":"hi"}', "embeddings", False),
    ("anthropic", "/v1/messages", ANTHROPIC,
     b'{"model":"claude-sonnet-5","max_tokens":9,"messages":[],"stream":true}', "messages", True),
    ("anthropic", "/v1/messages", ANTHROPIC, b'{"model":"claude-sonnet-5","max_tokens":9,"messages":[]}',
     "messages", False),
    ("gemini", "/v1beta/models/gemini-2.5-flash:generateContent", GEMINI, GEMINI_BODY, "generateContent", False),
    ("gemini", "/v1/models/gemini-2.5-flash:generateContent", GEMINI, GEMINI_BODY, "generateContent", False),
    ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEMINI, GEMINI_BODY,
     "streamGenerateContent", True),
    ("gemini", "/v1/models/gemini-2.5-flash:streamGenerateContent", GEMINI, GEMINI_BODY,
     "streamGenerateContent", True),
    ("gemini", "/v1beta/models/gemini-embedding-001:embedContent", GEMINI,
     b'{"content":{"parts":[{"text":"hi"}]}}', "embedContent", False),
    ("gemini", "/v1beta/models/gemini-embedding-001:batchEmbedContents", GEMINI,
     b'{"requests":[{"model":"models/gemini-embedding-001","content":{"parts":[{"text":"hi"}]}}]}',
     "batchEmbedContents", False),
]  # fmt: skip


@pytest.mark.parametrize(("prefix", "path", "headers", "body", "endpoint", "stream"), CASES)
async def test_byte_identical_and_metered(
    proxy: RunningProxy,
    upstream: FakeUpstream,
    prefix: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    endpoint: str,
    stream: bool,
) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(upstream.url + path, data=body, headers=headers) as response:
            direct_status, direct_type, direct = response.status, response.content_type, await response.read()
        async with session.post(f"{proxy.url}/{prefix}{path}", data=body, headers=headers) as response:
            status, content_type, proxied = response.status, response.content_type, await response.read()
    assert upstream.seen.body == body  # forwarded unchanged (the client asked for usage itself)
    assert (status, content_type) == (direct_status, direct_type) == (200, direct_type)
    assert proxied == direct
    record = await only_record(proxy)
    assert (record["provider"], record["endpoint"], record["stream"]) == (prefix, endpoint, stream)
    assert record["usage_source"] == ("estimated" if endpoint == "embedContent" else "provider")
    assert record["total_cost"] is not None and record["total_cost"] > 0
