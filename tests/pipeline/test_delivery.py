"""Delivery guarantees: retries, spill files, replay, overflow, and sinks that fail or hang."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from llmtally.config import PipelineConfig
from llmtally.pipeline import MemorySink, RecordPipeline
from llmtally.pipeline.sinks import WebhookSink
from llmtally.record import TokenUsage, UsageRecord
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.conftest import API_KEY


def record(i: int) -> UsageRecord:
    return UsageRecord(
        timestamp="2026-11-24T00:00:00.000Z", request_id=f"r{i:05d}", provider="openai", endpoint="chat.completions",
        request_model="gpt-4o", model="gpt-4o", stream=False, status=200, usage=TokenUsage(10, 5),
        usage_source="provider", cost=None, price_source="unknown_model", latency_ms=1.0, ttfb_ms=None,
    )  # fmt: skip


def fast(tmp_path: Path, **overrides: Any) -> PipelineConfig:
    settings: dict[str, Any] = {
        "spill_dir": str(tmp_path / "spill"), "batch_size": 20, "retry_attempts": 3, "retry_backoff_s": 0.01,
        "retry_backoff_max_s": 0.05, "replay_interval_s": 0.1, "sink_timeout_s": 1.0,
    }  # fmt: skip
    settings.update(overrides)
    return PipelineConfig(**settings)


class Receiver:
    """A webhook receiver that honours Idempotency-Key, and can be made to die mid-batch."""

    def __init__(self) -> None:
        self.stored: Counter[str] = Counter()
        self.keys: set[str] = set()
        self.posts = 0
        self.die_on_posts: set[int] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = orjson.loads(await request.read())
        key = request.headers["Idempotency-Key"]
        if key not in self.keys:
            self.keys.add(key)
            self.stored.update(r["request_id"] for r in body["records"])
        if self.posts in self.die_on_posts:
            # Stored, but the connection dies before the answer: the sender must retry.
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("receiver died mid-batch")
        return web.json_response({"ok": True})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}/ingest"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_sink_killed_mid_batch_and_restarted_gets_every_record_exactly_once(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.die_on_posts = {2, 5}
    url = await receiver.start()
    pipeline = RecordPipeline([WebhookSink(url, timeout_s=1.0)], fast(tmp_path))
    pipeline.start()
    for i in range(100):
        pipeline.submit(record(i))
    await asyncio.sleep(0.05)
    await receiver.stop()  # the sink goes away entirely for a while: retries fail, records spill
    for i in range(100, 200):
        pipeline.submit(record(i))
    await asyncio.sleep(0.5)
    await receiver.start()  # back on the same port
    await pipeline.flush()
    for _ in range(50):  # spilled records come back through the replay loop
        if len(receiver.stored) == 200:
            break
        await asyncio.sleep(0.1)
    await pipeline.close()
    await receiver.stop()
    assert sorted(receiver.stored) == [f"r{i:05d}" for i in range(200)]
    assert set(receiver.stored.values()) == {1}  # exactly once, despite retries and replays
    assert pipeline.stats.spilled["webhook:127.0.0.1"] > 0


async def test_spilled_records_survive_a_restart(tmp_path: Path) -> None:
    class Broken:
        name = "warehouse"

        async def write(self, records: list[dict[str, Any]]) -> None:
            raise OSError("disk on fire")

        async def close(self) -> None:
            return None

    first = RecordPipeline([Broken()], fast(tmp_path))
    for i in range(30):
        first.submit(record(i))
    await first.close()
    assert first.stats.failed["warehouse"] == 30
    spilled = list((tmp_path / "spill").glob("warehouse.jsonl*"))  # the file, or its replay copy
    assert sum(len(p.read_bytes().splitlines()) for p in spilled) == 30  # on disk, not lost

    fixed = MemorySink()
    fixed.name = "warehouse"  # the same sink, repaired: its spill file is found by name
    second = RecordPipeline([fixed], fast(tmp_path))
    second.start()
    await second.flush()
    await second.close()
    assert [r["request_id"] for r in fixed.records] == [f"r{i:05d}" for i in range(30)]
    assert not list((tmp_path / "spill").glob("warehouse.jsonl*"))


async def test_queue_overflow_spills_or_drops(tmp_path: Path) -> None:
    memory = MemorySink()
    pipeline = RecordPipeline([memory], fast(tmp_path, max_queue=10))
    pipeline.start()
    accepted = [pipeline.submit(record(i)) for i in range(100)]  # faster than the worker can run
    assert accepted.count(False) > 0
    await pipeline.flush()
    await pipeline.close()
    assert sorted(r["request_id"] for r in memory.records) == [f"r{i:05d}" for i in range(100)]
    assert pipeline.stats.spilled["overflow"] == accepted.count(False)

    dropping = RecordPipeline([MemorySink()], fast(tmp_path, max_queue=10, overflow="drop"))
    dropping.start()
    results = [dropping.submit(record(i)) for i in range(100)]
    await dropping.close()
    assert dropping.stats.dropped == results.count(False) > 0


async def test_hanging_sink_holds_up_neither_traffic_nor_other_sinks(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    class Hanging:
        name = "hanging"

        async def write(self, records: list[dict[str, Any]]) -> None:
            await asyncio.Event().wait()

        async def close(self) -> None:
            return None

    config = config_for_upstream(upstream.url)
    config = type(config)(**{**{f: getattr(config, f) for f in config.__slots__}, "pipeline": fast(
        tmp_path, sink_queue=2, retry_attempts=1, sink_timeout_s=30.0, batch_size=5)})  # fmt: skip
    proxy = await start_proxy(config, sinks=[Hanging()])  # type: ignore[list-item]
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(60):
                async with asyncio.timeout(5):  # a call never waits on the hanging sink
                    async with session.post(
                        proxy.url + "/openai/v1/chat/completions", data=body,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    ) as response:  # fmt: skip
                        assert response.status == 200
                        await response.read()
        for _ in range(50):
            if len(proxy.records) == 60:
                break
            await asyncio.sleep(0.05)
        assert len(proxy.records) == 60  # the memory sink got everything meanwhile
        assert proxy.pipeline.stats.spilled["hanging"] > 0  # the hanging sink's backlog went to disk
    finally:
        await proxy.runner.cleanup()
