"""Shared fixtures: a real fake upstream and the real proxy, both on loopback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from llmtally.config import Config
from llmtally.testing import FakeUpstream, FakeUpstreamConfig
from llmtally.testing.harness import RunningProxy, config_for_upstream, start_proxy

API_KEY = "sk-test-SECRET-0123456789"

# Hypothesis profiles (docs/reliability.md, "Fuzzing and soak"): ``fast`` in ``make test`` (the
# hypothesis default of 100 examples; the socket-level fuzz tests take a fraction of it),
# ``soak`` in ``make soak`` (HYPOTHESIS_PROFILE=soak, or pytest's --hypothesis-profile=soak).
# No per-example deadline: 2 shared cores make timings noise, and a hang is bounded by each test.
settings.register_profile("fast", max_examples=100, deadline=None, print_blob=True)
settings.register_profile(
    "soak", max_examples=4000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture(autouse=True, scope="session")
def private_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The suite's temp files, and those of the processes it starts, go to pytest's own temp dir.

    The default spill dir is ``<temp dir>/llmtally-spill``: left at the machine's, records a test
    spills (a failing hook) would be replayed by every later run, and by a real proxy on the machine.
    """
    path = tmp_path_factory.mktemp("tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(path))
    patch.setattr(tempfile, "tempdir", str(path))
    yield path
    patch.undo()


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
