"""A real Redis server per test, on loopback (llmtally.testing.redis_server: no fake, no skip)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmtally.testing.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.stop()
