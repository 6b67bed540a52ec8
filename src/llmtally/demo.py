"""``llmtally demo``: the proxy in front of a built-in fake upstream, driven by the official SDKs.

No API key and no network: a newcomer sees the records the proxy writes for each provider,
streamed and not.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from llmtally.config import Config
from llmtally.pipeline import render_records
from llmtally.serving import with_fake_upstream
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import start_proxy

DEMO_KEY = "demo-key-not-a-secret"


async def _calls(base: str) -> list[tuple[str, Any]]:
    try:
        import openai
    except ImportError:
        raise SystemExit("llmtally demo needs the openai SDK: pip install 'llmtally[demo]'") from None
    import anthropic
    from google import genai
    from google.genai import types

    oa = openai.AsyncOpenAI(api_key=DEMO_KEY, base_url=f"{base}/openai/v1")
    an = anthropic.AsyncAnthropic(api_key=DEMO_KEY, base_url=f"{base}/anthropic")
    gm = genai.Client(api_key=DEMO_KEY, http_options=types.HttpOptions(base_url=f"{base}/gemini"))
    done: list[tuple[str, Any]] = []
    messages: Any = [{"role": "user", "content": "Say hello"}]

    chat = await oa.chat.completions.create(model="gpt-4o", messages=messages)
    done.append(("openai chat", chat.choices[0].message.content))
    stream = await oa.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    done.append(("openai chat (stream)", text))

    msg = await an.messages.create(model="claude-sonnet-5", max_tokens=100, messages=messages)
    done.append(("anthropic messages", msg.content[0].text))  # type: ignore[union-attr]
    async with an.messages.stream(model="claude-sonnet-5", max_tokens=100, messages=messages) as s:
        text = "".join([t async for t in s.text_stream])
    done.append(("anthropic messages (stream)", text))

    resp = await gm.aio.models.generate_content(model="gemini-2.5-flash", contents="Say hello")
    done.append(("gemini generateContent", resp.text))
    chunks = await gm.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="Say hello")
    text = "".join([c.text or "" async for c in chunks])
    done.append(("gemini streamGenerateContent", text))
    await oa.close()
    await an.close()
    return done


async def _demo() -> int:
    upstream = FakeUpstream()
    upstream_url = await upstream.start()
    proxy = await start_proxy(with_fake_upstream(Config(), upstream_url))  # records say fake_upstream
    try:
        out = sys.stdout
        out.write(f"fake upstream at {upstream_url}; llmtally proxy at {proxy.url}\n\n")
        for name, text in await _calls(proxy.url):
            out.write(f"  {name:32s} → {text!r}\n")
        records = await proxy.flush()
        out.write(
            f"\n{len(records)} usage records (one JSON line per call, as `llmtally serve` logs them):\n\n"
        )
        out.write(render_records(records).decode())
        out.flush()
    finally:
        await proxy.stop()
        await upstream.stop()
    return 0


def run_demo() -> int:
    return asyncio.run(_demo())
