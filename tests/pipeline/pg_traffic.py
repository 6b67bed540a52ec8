"""SDK calls through the real proxy whose records cover every kind of column value: tags, streams,
line items (Anthropic's web search and fetch), an unpriced model, an upstream error."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import anthropic
import openai

from tests.conftest import API_KEY

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
WEB_TOOLS: Any = [
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
    {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 5},
]


class Proxy(Protocol):
    """The in-process harness's RunningProxy, or `llmtally serve` at a URL."""

    @property
    def url(self) -> str: ...


async def traffic(proxy: Proxy, tenant: str = "acme", rounds: int = 1) -> int:
    """Make the calls (``rounds`` times); returns how many calls were made."""
    tags = {"x-llmtally-tag-tenant": tenant, "x-llmtally-tag-team": "search"}
    oa = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{proxy.url}/openai/v1", max_retries=0)
    an = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=f"{proxy.url}/anthropic", max_retries=0)
    calls = 0
    try:
        for _ in range(rounds):
            await oa.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=tags)
            stream = await oa.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            async for _chunk in stream:
                pass
            await oa.embeddings.create(model="text-embedding-3-small", input="hello")
            await an.messages.create(
                model="claude-sonnet-4-5", max_tokens=2000, messages=MESSAGES, tools=WEB_TOOLS,
                extra_headers={"x-llmtally-tag-tenant": tenant},
            )  # fmt: skip
            async with an.messages.stream(model="claude-sonnet-5", max_tokens=100, messages=MESSAGES) as s:
                await s.get_final_message()
            await oa.chat.completions.create(model="no-such-model-7", messages=MESSAGES)  # unpriced
            with contextlib.suppress(anthropic.InternalServerError):
                await an.messages.create(model="fake-error-500", max_tokens=10, messages=MESSAGES)
            calls += 7
    finally:
        await oa.close()
        await an.close()
    return calls
