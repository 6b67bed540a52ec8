"""Shared fixtures: a real fake upstream and the real proxy, both on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from llmtally.config import Config
from llmtally.testing import FakeUpstream, FakeUpstreamConfig
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
API_KEY = "sk-test-SECRET-0123456789"

MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(FakeUpstreamConfig())
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_proxy(upstream: FakeUpstream) -> AsyncIterator[MakeProxy]:
    """Start a proxy in front of ``upstream``; keyword arguments override [metering] settings."""
    started: list[RunningProxy] = []

    async def make(config: Config | None = None, **metering: Any) -> RunningProxy:
        proxy = await start_proxy(config_for_upstream(upstream.url, config, **metering))
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> RunningProxy:
    return await make_proxy()
