"""Every example in examples/ runs against the fake upstream, through the real proxy where it uses one."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy
from tests.conftest import API_KEY

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


async def run_example(name: str, **env: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / name),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OPENAI_API_KEY": API_KEY, "ANTHROPIC_API_KEY": API_KEY, "GEMINI_API_KEY": API_KEY, **env},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_openai_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("openai_proxy.py", LLMTALLY_URL=proxy.url)
    assert (
        "chat: Hello from the" in out
        and "stream: Hello from the" in out
        and "responses: Hello from the" in out
    )
    records = await proxy.flush()
    assert [(r["endpoint"], r["stream"]) for r in records] == [
        ("chat.completions", False), ("chat.completions", True), ("responses", False)]  # fmt: skip
    assert records[0]["tags"] == {"feature": "greeting"}
    assert all(r["usage_source"] == "provider" and r["total_cost"] > 0 for r in records)


async def test_anthropic_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("anthropic_proxy.py", LLMTALLY_URL=proxy.url)
    assert "message: Hello from the" in out and "stream: Hello from the" in out
    records = await proxy.flush()
    assert [r["stream"] for r in records] == [False, True]
    assert all(r["provider"] == "anthropic" and r["input_tokens"] == 12050 for r in records)


async def test_gemini_proxy_example(proxy: RunningProxy) -> None:
    out = await run_example("gemini_proxy.py", LLMTALLY_URL=proxy.url)
    assert "generate: Hello from the" in out and "embed: dimensions 4" in out
    records = await proxy.flush()
    assert [r["endpoint"] for r in records] == [
        "generateContent",
        "streamGenerateContent",
        "batchEmbedContents",
    ]
    assert all(r["tags"] == {"feature": "greeting"} for r in records)


async def test_library_examples(upstream: FakeUpstream) -> None:
    out = await run_example("openai_library.py", OPENAI_BASE_URL=f"{upstream.url}/v1")
    assert "before sending: 22 input tokens (exact=True, o200k_base)" in out
    assert "after: 1200 in / 300 out (provider), cost $0.000" in out
    out = await run_example("anthropic_library.py", ANTHROPIC_BASE_URL=upstream.url)
    assert "exact=False" in out and "after: 12050 in / 400 out (provider)" in out
    out = await run_example("gemini_library.py", GEMINI_BASE_URL=upstream.url)
    assert "(exact=True, gemma3)" in out and "after: 3000 in / 750 out (provider)" in out


async def test_tenant_service_example(proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("tenant_service", EXAMPLES / "tenant_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    runner = web.AppRunner(module.create_app(proxy.url), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    service = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            for tenant in ("acme", "acme", "globex"):
                async with session.post(
                    f"{service}/ask", data="What is 2+2?", headers={"X-Tenant": tenant}
                ) as r:
                    assert (await r.json())["tenant"] == tenant
    finally:
        await runner.cleanup()
    records = await proxy.flush()
    assert [r["tags"]["tenant"] for r in records] == ["acme", "acme", "globex"]
    from llmtally.pipeline.report import build_report

    totals, groups = build_report(records, ["tag:tenant"])
    assert {k[0]: g.records for k, g in groups.items()} == {"acme": 2, "globex": 1}
    assert totals.total_cost == sum(r["total_cost"] for r in records)
