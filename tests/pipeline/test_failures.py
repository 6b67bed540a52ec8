"""One record never blocks another; sinks that fail, fill the disk or hang; loss counted and logged once.

Before the per-record rendering (730cfed) one record with a lone surrogate made every JSON sink's batch
fail, then the spill too: its neighbours and everything after were lost. These tests build such records
directly (the proxy no longer produces them from header bytes) and check the mechanism.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from llmtally.pipeline import JsonLinesSink, MemorySink, RecordPipeline
from llmtally.pipeline.prometheus import PrometheusSink
from llmtally.pipeline.sinks import CallbackSink, RecordsRejected, RotatingFileSink, WebhookSink
from llmtally.pipeline.spill import SpillFile, read_records
from llmtally.record import UsageRecord
from tests.pipeline.test_delivery import fast, record

POISON_TAG = "caf\udce9\udcff"  # what surrogateescape makes of the header bytes caf\xe9\xff


def poison(i: int) -> UsageRecord:
    return dataclasses.replace(record(i), tags={"team": POISON_TAG})


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [str(r["request_id"]) for r in records]


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def quarantined(tmp_path: Path) -> list[dict[str, Any]]:
    return lines_of(tmp_path / "spill" / "quarantine.jsonl")


def metrics_of(pipeline: RecordPipeline) -> str:
    prometheus = next(s for s in pipeline.sinks if isinstance(s, PrometheusSink))
    return prometheus.render().decode()


def with_metrics(sinks: list[Any], config: Any) -> RecordPipeline:
    prometheus = PrometheusSink()
    pipeline = RecordPipeline([*sinks, prometheus], config)
    prometheus.bind(pipeline)
    return pipeline


def error_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and text in r.getMessage()]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A named pipe nobody reads: opening it for writing blocks for ever (a sink that hangs)."""
    path = tmp_path / "hangs.jsonl"
    os.mkfifo(path)
    yield path
    # Release the thread still blocked in open(): a reader appears, takes nothing, goes away.
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.close(reader)


async def test_a_poison_record_is_quarantined_once_and_its_neighbours_are_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, rotated = tmp_path / "out.jsonl", tmp_path / "rotated.jsonl"
    memory = MemorySink()
    pipeline = with_metrics(
        [JsonLinesSink(str(out)), RotatingFileSink(str(rotated), 10**9, 1), memory], fast(tmp_path)
    )
    pipeline.start()
    for i in range(50):
        pipeline.submit(poison(i) if i in (7, 31) else record(i))  # same batches as their neighbours
    await pipeline.close()

    good = [f"r{i:05d}" for i in range(50) if i not in (7, 31)]
    assert ids(lines_of(out)) == good
    assert ids(lines_of(rotated)) == good
    assert ids(memory.records) == good
    kept = quarantined(tmp_path)
    assert ids([q["record"] for q in kept]) == ["r00007", "r00031"]
    assert {(q["sink"], q["reason"]) for q in kept} == {("pipeline", "unrenderable")}
    assert kept[0]["record"]["tags"] == {"team": "caf\\udce9\\udcff"}  # readable, nothing dropped
    logged = error_lines(caplog, "quarantined")
    assert len(logged) == 2 and "r00007" in logged[0] and "r00031" in logged[1]  # once per record
    assert 'llmtally_records_quarantined_total{reason="unrenderable",sink="pipeline"} 2.0' in metrics_of(
        pipeline
    )
    assert pipeline.stats.failed == Counter() and pipeline.stats.lost == Counter()
    assert not list((tmp_path / "spill").glob("*_*.jsonl*"))  # no sink had to spill anything


async def test_overflowing_poison_is_quarantined_and_never_blocks_the_overflow_file(tmp_path: Path) -> None:
    memory = MemorySink()
    pipeline = RecordPipeline([memory], fast(tmp_path, max_queue=5))
    pipeline.start()
    accepted = [pipeline.submit(poison(i) if i % 10 == 3 else record(i)) for i in range(60)]
    assert accepted.count(False) > 20  # most went through the overflow file
    await pipeline.close()
    assert sorted(ids(memory.records)) == [f"r{i:05d}" for i in range(60) if i % 10 != 3]
    assert sorted(ids([q["record"] for q in quarantined(tmp_path)])) == [
        f"r{i:05d}" for i in range(3, 60, 10)
    ]
    assert pipeline.stats.lost == Counter()


async def test_sinks_and_the_spill_render_each_record_alone(tmp_path: Path) -> None:
    batch = [record(i).to_dict() for i in range(3)]
    batch.insert(1, poison(9).to_dict())
    path = tmp_path / "direct.jsonl"
    sink = JsonLinesSink(str(path))
    with pytest.raises(RecordsRejected) as refused:
        await sink.write(batch)
    await sink.close()
    assert refused.value.permanent and ids(refused.value.records) == ["r00009"]
    assert ids(lines_of(path)) == ["r00000", "r00001", "r00002"]

    spill = SpillFile(tmp_path / "spill.jsonl")
    assert ids(spill.append(batch)) == ["r00009"]  # handed back for the quarantine
    assert ids(read_records(spill.path)) == ["r00000", "r00001", "r00002"]


async def test_a_callback_raising_for_one_record_does_not_stop_the_others(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    def picky(rec: dict[str, Any]) -> None:
        calls[rec["request_id"]] += 1
        if rec["request_id"] == "r00013":
            raise ValueError("this one is not for me")

    hook = CallbackSink(picky, name="hook:picky")
    pipeline = with_metrics([hook], fast(tmp_path))
    pipeline.start()
    for i in range(40):
        pipeline.submit(record(i))
    await pipeline.close()
    assert pipeline.stats.delivered["hook:picky"] == 39
    assert {k: v for k, v in calls.items() if v != 1} == {"r00013": 3}  # retried alone, others once
    kept = quarantined(tmp_path)
    assert [(q["record"]["request_id"], q["sink"], q["reason"]) for q in kept] == [
        ("r00013", "hook:picky", "rejected")
    ]
    assert "ValueError: this one is not for me" in kept[0]["error"]
    assert 'llmtally_records_quarantined_total{reason="rejected",sink="hook:picky"} 1.0' in metrics_of(
        pipeline
    )


class PickyReceiver:
    """A webhook receiver that answers 400 to any batch holding one of ``refused``."""

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused
        self.stored: Counter[str] = Counter()
        self.posts = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        got = [r["request_id"] for r in orjson.loads(await request.read())["records"]]
        if self.refused & set(got):
            return web.json_response({"error": "bad record"}, status=400)
        self.stored.update(got)
        return web.json_response({"ok": True})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/ingest"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_a_webhook_refusing_a_batch_gets_every_record_but_the_refused_one(tmp_path: Path) -> None:
    receiver = PickyReceiver({"r00005", "r00042"})
    url = await receiver.start()
    pipeline = RecordPipeline([WebhookSink(url, timeout_s=2.0)], fast(tmp_path, batch_size=20))
    pipeline.start()
    for i in range(60):
        pipeline.submit(record(i))
    await pipeline.close()
    await receiver.stop()
    assert sorted(receiver.stored) == [f"r{i:05d}" for i in range(60) if i not in (5, 42)]
    assert set(receiver.stored.values()) == {1}
    kept = quarantined(tmp_path)
    assert sorted(q["record"]["request_id"] for q in kept) == ["r00005", "r00042"]
    assert {q["reason"] for q in kept} == {"rejected"} and "400" in kept[0]["error"]
    assert not list((tmp_path / "spill").glob("webhook*"))


async def test_a_file_sink_on_a_full_disk_spills_and_the_others_keep_delivering(tmp_path: Path) -> None:
    memory = MemorySink()
    full = RotatingFileSink("/dev/full", 10**9, 0)  # every write fails with ENOSPC
    pipeline = with_metrics([full, memory], fast(tmp_path, retry_attempts=2))
    pipeline.start()
    for i in range(45):
        pipeline.submit(record(i))
    await pipeline.close()
    assert ids(memory.records) == [f"r{i:05d}" for i in range(45)]
    assert pipeline.stats.failed["file:/dev/full"] == 45
    assert pipeline.stats.spilled["file:/dev/full"] == 45
    spilled = list((tmp_path / "spill").glob("file__dev_full.jsonl*"))
    assert sorted(ids([r for p in spilled for r in read_records(p)])) == [f"r{i:05d}" for i in range(45)]
    assert 'llmtally_records_spilled_total{sink="file:/dev/full"} 45.0' in metrics_of(pipeline)
    assert pipeline.stats.lost == Counter() and quarantined(tmp_path) == []


async def test_a_failing_sink_with_an_unusable_spill_dir_counts_its_loss_and_logs_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The spill dir is a regular file: every spill write fails with ENOTDIR. (The suite runs as root,
    # for whom a chmod-ed directory stays writable; this fails for every user alike.)
    blocker = tmp_path / "spill"
    blocker.write_text("not a directory\n")
    memory = MemorySink()
    pipeline = with_metrics(
        [RotatingFileSink("/dev/full", 10**9, 0), memory], fast(tmp_path, retry_attempts=1)
    )
    pipeline.start()
    for wave in range(3):  # several batches, several failed spills
        for i in range(wave * 20, wave * 20 + 20):
            pipeline.submit(record(i))
        await pipeline.flush()
    async with asyncio.timeout(30):  # a hang guard: close() is bounded by close_timeout_s
        await pipeline.close()
    assert ids(memory.records) == [f"r{i:05d}" for i in range(60)]  # traffic kept flowing
    assert pipeline.stats.lost[("file:/dev/full", "spill failed")] == 60
    assert 'llmtally_records_lost_total{reason="spill failed",sink="file:/dev/full"} 60.0' in metrics_of(
        pipeline
    )
    logged = error_lines(caplog, "LOST")
    assert len(logged) == 1 and "File exists" in logged[0]  # once a minute, not per batch
    assert not error_lines(caplog, "spilled to")  # nothing claims to be safe that is not


async def test_a_hanging_sink_times_out_spills_and_close_stays_bounded(tmp_path: Path, fifo: Path) -> None:
    memory = MemorySink()
    hanging = RotatingFileSink(str(fifo), 10**9, 0)  # its first write blocks in open() for ever
    config = fast(tmp_path, retry_attempts=1, sink_timeout_s=0.3, close_timeout_s=2.0, sink_queue=2)
    pipeline = RecordPipeline([hanging, memory], config)
    pipeline.start()
    for i in range(100):
        pipeline.submit(record(i))
        if i % 20 == 19:
            await asyncio.sleep(0.05)  # several batches
    for _ in range(100):
        if len(memory.records) == 100:
            break
        await asyncio.sleep(0.05)
    assert ids(memory.records) == [f"r{i:05d}" for i in range(100)]  # never held up by the hang
    async with asyncio.timeout(15):  # a hang guard: close() gives up after close_timeout_s
        await pipeline.close()
    name = f"file:{fifo}"
    spill_files = list((tmp_path / "spill").glob("file_*hangs.jsonl*"))
    kept = [r for p in spill_files for r in read_records(p)]
    # Nothing reached the pipe, nothing is lost: every record waits in the spill file for the next start.
    assert pipeline.stats.delivered[name] == 0
    assert sorted(set(ids(kept))) == [f"r{i:05d}" for i in range(100)]
    assert pipeline.stats.lost == Counter()


class Odd:
    """A tag value that is no string; the JSON renderer writes its repr, which here is not UTF-8."""

    def __repr__(self) -> str:
        return POISON_TAG


async def test_a_record_only_one_sink_cannot_render_is_quarantined_for_that_sink_alone(
    tmp_path: Path,
) -> None:
    # Plain JSON for the pipeline's check (an object), not for the JSON-lines renderer (its repr has a
    # lone surrogate): the sink's own per-record rendering catches it; the memory sink takes it as is.
    out = tmp_path / "out.jsonl"
    memory = MemorySink()
    pipeline = RecordPipeline([JsonLinesSink(str(out)), memory], fast(tmp_path))
    odd = dataclasses.replace(record(3), tags={"team": Odd()})  # type: ignore[dict-item]
    for i in range(6):
        pipeline.submit(odd if i == 3 else record(i))
    await pipeline.close()
    assert ids(lines_of(out)) == ["r00000", "r00001", "r00002", "r00004", "r00005"]
    assert ids(memory.records) == [f"r{i:05d}" for i in range(6)]
    kept = quarantined(tmp_path)
    assert [(q["record"]["request_id"], q["sink"], q["reason"]) for q in kept] == [
        ("r00003", f"jsonl:{out}", "unrenderable")
    ]
    assert kept[0]["record"]["tags"] == {"team": "caf\\udce9\\udcff"}


async def test_a_refused_record_in_a_spill_file_does_not_hold_the_replay_back(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    state = {"down": True}

    def warehouse(rec: dict[str, Any]) -> None:
        calls[rec["request_id"]] += 1
        if state["down"] or rec["request_id"] == "r00013":
            raise ConnectionError("warehouse unavailable")

    pipeline = RecordPipeline(
        [CallbackSink(warehouse, name="hook:warehouse")], fast(tmp_path, retry_attempts=1)
    )
    pipeline.start()
    for i in range(30):
        pipeline.submit(record(i))
    await pipeline.flush()
    assert pipeline.stats.spilled["hook:warehouse"] == 30  # nothing got through: down, not picky
    assert quarantined(tmp_path) == []
    state["down"] = False
    calls.clear()
    assert await pipeline.replay()  # the sink is up: its neighbours go in, r00013 alone is quarantined
    await pipeline.close()
    assert pipeline.stats.delivered["hook:warehouse"] == 29
    assert {k: v for k, v in calls.items() if k != "r00013"} == {f"r{i:05d}": 1 for i in range(30) if i != 13}
    assert [q["record"]["request_id"] for q in quarantined(tmp_path)] == ["r00013"]
    assert not list((tmp_path / "spill").glob("hook_warehouse.jsonl*"))


async def test_a_webhook_refusing_everything_gets_records_spilled_not_quarantined(tmp_path: Path) -> None:
    receiver = PickyReceiver({f"r{i:05d}" for i in range(40)})  # a schema change: every batch gets 400
    url = await receiver.start()
    config = fast(tmp_path, batch_size=20, retry_attempts=1, replay_interval_s=600.0)  # no replay meanwhile
    pipeline = RecordPipeline([WebhookSink(url, timeout_s=2.0)], config)
    pipeline.start()
    for i in range(20):
        pipeline.submit(record(i))
    await pipeline.flush()
    split_once = receiver.posts  # the first batch was split to single records: 1 + 38 posts
    for i in range(20, 40):
        pipeline.submit(record(i))
    await pipeline.flush()
    await receiver.stop()
    await pipeline.close()
    assert split_once == 39
    assert receiver.posts - split_once < 39  # the next batch was not split again: the receiver refuses all
    assert quarantined(tmp_path) == []  # not the records' fault
    spilled = list((tmp_path / "spill").glob("webhook*"))
    assert sorted(ids([r for p in spilled for r in read_records(p)])) == [f"r{i:05d}" for i in range(40)]


class _Prebuilt:
    """A built record's dict, as a record job returns it (to put in values no UsageRecord field takes)."""

    def __init__(self, as_dict: dict[str, Any]) -> None:
        self._dict = as_dict

    def to_dict(self) -> dict[str, Any]:
        return self._dict


async def test_absurd_usage_is_quarantined_with_its_exact_numbers(tmp_path: Path) -> None:
    # Usage of 10^30 tokens (an upstream's lie): no JSON integer, and a cost too large to round.
    huge = dataclasses.replace(record(1), usage=dataclasses.replace(record(1).usage, input_tokens=10**30))
    as_dict = huge.to_dict()
    as_dict["total_cost"] = Decimal("1e30") * Decimal("0.0000025")
    memory = MemorySink()
    pipeline = RecordPipeline([JsonLinesSink(str(tmp_path / "out.jsonl")), memory], fast(tmp_path))
    pipeline.submit(lambda: _Prebuilt(as_dict))  # type: ignore[arg-type,return-value]
    pipeline.submit(record(2))
    await pipeline.close()
    assert ids(memory.records) == ["r00002"]
    (kept,) = quarantined(tmp_path)
    assert kept["record"]["input_tokens"] == str(10**30)
    assert kept["record"]["total_cost"] == "2.5E+24"
