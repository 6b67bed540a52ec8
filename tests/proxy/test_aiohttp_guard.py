"""aiohttp's protocols as the proxy runs them: guarded (head deadline, quiet client errors, no reuse
out of step). aiohttp keeps the hooks in private attributes; these tests fail loudly if it moves them."""

from __future__ import annotations

import dataclasses

import pytest

from llmtally.proxy.aiohttp_guard import GuardedRequestHandler, GuardedResponseHandler, GuardedServer
from llmtally.proxy.app import STATE_KEY
from llmtally.proxy.fastpath import FastPathServer
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy


@pytest.mark.parametrize("fast_path", [True, False])
async def test_the_proxy_serves_and_calls_upstreams_with_the_guarded_protocols(
    upstream: FakeUpstream, fast_path: bool
) -> None:
    config = config_for_upstream(upstream.url)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, fast_path=fast_path))
    proxy = await start_proxy(config)
    try:
        server = proxy.runner.server
        aiohttp_server = server.aiohttp_server if isinstance(server, FastPathServer) else server
        assert isinstance(aiohttp_server, GuardedServer)
        assert isinstance(aiohttp_server(), GuardedRequestHandler)
        session = proxy.app[STATE_KEY].session
        assert session is not None
        assert isinstance(session.connector._factory(), GuardedResponseHandler)  # type: ignore[union-attr]
    finally:
        await proxy.stop()
