"""Hot reload: new prices swap in atomically; bad files are rejected; in-flight calls stay consistent."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from llmtally.config import load_config
from llmtally.pricing import PriceBook
from llmtally.pricing.reload import PriceReloader
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.conftest import API_KEY


def price_config(path: Path, input_rate: int, upstream: str = "http://127.0.0.1:1") -> None:
    path.write_text(
        f'[upstreams]\nopenai = "{upstream}"\n[pricing]\nreload_interval_s = 0.05\n'
        f'[pricing.models."gpt-4o"]\ninput = {input_rate}\noutput = 0\n'
    )


async def test_reload_applies_changes_and_rejects_bad_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.toml"
    price_config(path, 1)
    config = load_config(path, env={})
    applied: list[PriceBook] = []
    first = PriceBook(config.pricing)
    reloader = PriceReloader(config, str(path), applied.append, first)
    assert not await reloader.check()  # nothing changed

    price_config(path, 2)
    assert await reloader.check()
    assert applied[-1].version != first.version
    assert applied[-1].quote("openai", "gpt-4o", __usage()).cost.input_cost == Decimal(2)  # type: ignore[union-attr]

    path.write_text('[pricing.models."gpt-4o"]\ninput = "two"\noutput = 0\n')
    with caplog.at_level(logging.ERROR):
        assert not await reloader.check()
    assert len(applied) == 1  # the old prices stay in force
    assert f'{path}:2: [pricing.models."gpt-4o"] input: not a number' in caplog.text
    assert reloader.failures == 1

    reloader.start()  # polling picks up a fixed file by itself
    price_config(path, 3)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if len(applied) == 2:
            break
    await reloader.stop()
    assert applied[-1].quote("openai", "gpt-4o", __usage()).cost.input_cost == Decimal(3)  # type: ignore[union-attr]


def __usage() -> object:
    from llmtally.record import TokenUsage

    return TokenUsage(1_000_000, 0)


async def test_reload_while_requests_are_in_flight(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.config.chunks = 4
    upstream.config.chunk_interval_s = 0.005
    path = tmp_path / "config.toml"
    price_config(path, 1, upstream.url)
    config = config_for_upstream(upstream.url, load_config(path, env={}))
    proxy = await start_proxy(config)
    meter = proxy.meter
    reloader = PriceReloader(config, str(path), meter.use_prices, meter.prices)
    expected: dict[str, Decimal] = {meter.prices.version: Decimal("0.0012")}  # 1200 input tokens at $1/M
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'

    async def call(session: aiohttp.ClientSession) -> None:
        async with session.post(
            proxy.url + "/openai/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response:
            assert response.status == 200
            await response.read()

    async def reload_storm() -> None:
        for rate in range(2, 12):
            price_config(path, rate, upstream.url)
            assert await reloader.check()
            expected[meter.prices.version] = Decimal(rate) * 1200 / 1_000_000
            await asyncio.sleep(0.01)

    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(reload_storm(), *(call(session) for _ in range(300)))
        records = await proxy.flush()
    finally:
        await proxy.stop()
    assert len(records) == 300  # nothing lost
    versions = {r["price_version"] for r in records}
    assert len(versions) > 1  # the storm really overlapped the calls
    for record in records:
        # Each call priced wholly by the one price set its record names.
        assert record["input_cost"] == expected[record["price_version"]], record
