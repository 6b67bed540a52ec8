"""Helpers for end-to-end proxy tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from llmtally.testing import FakeUpstream
from llmtally.testing.harness import RunningProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFIX = {"openai": "/openai", "anthropic": "/anthropic", "gemini": "/gemini"}


async def only_record(proxy: RunningProxy) -> dict[str, Any]:
    records = await proxy.flush()
    assert len(records) == 1, records
    record = records[0]
    proxy.records.clear()
    return record


async def first_record(proxy: RunningProxy, timeout_s: float = 5.0) -> dict[str, Any]:
    """The one record of a call whose record comes later (a disconnect, a drain)."""
    for _ in range(int(timeout_s / 0.1)):
        if await proxy.flush():
            break
        await asyncio.sleep(0.1)
    return await only_record(proxy)


def money(value: Any) -> Decimal | None:
    """Record costs are Decimal in memory (JSON numbers on the wire)."""
    return None if value is None else Decimal(str(value))


async def replay(proxy: RunningProxy, upstream: FakeUpstream, provider: str) -> tuple[bytes, bytes]:
    """Send the request the upstream last saw, directly and through the proxy; return both bodies."""
    seen = upstream.seen
    headers = {k: v for k, v in seen.headers.items() if k.lower() not in ("host", "content-length")}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(upstream.url + seen.path_qs, data=seen.body, headers=headers) as direct:
            direct_body = await direct.read()
        async with session.post(
            proxy.url + PREFIX[provider] + seen.path_qs, data=seen.body, headers=headers
        ) as proxied:
            proxied_body = await proxied.read()
    return direct_body, proxied_body


def assert_usage(record: dict[str, Any], **expected: Any) -> None:
    got = {k: (money(record[k]) if k.endswith("_cost") else record[k]) for k in expected}
    want = {k: (Decimal(v) if k.endswith("_cost") and v is not None else v) for k, v in expected.items()}
    assert got == want, f"record {record}"


async def serve_post(path: str, handler: Handler) -> tuple[web.AppRunner, str]:
    """A one-route aiohttp server on a free loopback port (a scripted upstream or receiver): its runner
    (the caller cleans it up) and base URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
