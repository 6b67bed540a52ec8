"""The exchange journal: segments written by workers, books kept by the record process, recovery
that gives each sink exactly the records it lacks (real files, real sockets, real pipeline)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from llmtally.config import PipelineConfig
from llmtally.exchange import Exchange
from llmtally.pipeline.journal import (
    MARKS_SUFFIX,
    JournalInUse,
    JournalWriter,
    RecordJournal,
    read_segment,
    tail_request_ids,
)
from llmtally.pipeline.link import LinkClient, LinkServer, exchange_to_wire
from llmtally.pipeline.queue import RecordPipeline
from llmtally.pipeline.sinks import CallbackSink, JsonLinesSink, render_records
from tests.pipeline.test_link import _exchange


def _frame(n: int) -> bytes:
    from llmtally.pipeline.link import _frame as frame

    return frame(exchange_to_wire(_exchange(n)))


def _record(exchange: Exchange) -> dict[str, Any]:
    return _line(exchange.request_id)


def _line(request_id: str, **more: Any) -> dict[str, Any]:
    return {"event": "llm_usage", "request_id": request_id, **more}


def _ids(path: Path) -> list[str]:
    return [orjson.loads(line)["request_id"] for line in path.read_bytes().splitlines()]


def _config(tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(spill_dir=str(tmp_path / "spill"), batch_size=8, replay_interval_s=0.05)


def test_a_segment_reads_back_in_order_without_its_torn_last_frame(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path, "run1", segment_bytes=1 << 20, fsync=False)
    path = Path(writer.open())
    for n in range(3):
        writer.append(_frame(n))
    with open(path, "ab") as fh:  # killed in the middle of a write
        fh.write(_frame(3)[:20])
    assert [t[0] for t in read_segment(path)] == ["id-0", "id-1", "id-2"]
    # While the worker lives the segment is locked: the record process leaves it alone.
    other = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert writer.seal() == (str(path), 3)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


def test_a_full_segment_makes_the_link_start_another(tmp_path: Path) -> None:
    async def main() -> list[str]:
        pipeline = RecordPipeline([JsonLinesSink(str(tmp_path / "out.jsonl"))], _config(tmp_path))
        journal = RecordJournal(tmp_path / "j", "run1", pipeline, _record, lambda _: None, {}, False, set)
        received: list[Exchange] = []
        server = LinkServer(str(tmp_path / "link.sock"), received.append, lambda _: None, journal.tracker)
        await server.start()
        writer = JournalWriter(tmp_path / "j", "run1", segment_bytes=1, fsync=False)
        client = await LinkClient.connect(server.path, journal=writer)
        for n in range(3):
            client.submit(_exchange(n))
        await client.close()
        await server.close()
        assert [e.request_id for e in received] == ["id-0", "id-1", "id-2"]
        # Nothing delivered yet: three sealed segments, each complete, waiting for their records.
        assert sorted(journal.tracker.segments) == sorted(str(p) for p in (tmp_path / "j").glob("*.jnl"))
        return [key for key in journal.tracker.segments if journal.tracker.complete(key)]

    assert len(asyncio.run(main())) == 3


async def test_delivered_segments_are_deleted_and_undelivered_ones_kept_marked(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    pipeline = RecordPipeline([JsonLinesSink(str(out))], _config(tmp_path))
    journal = RecordJournal(tmp_path / "j", "run1", pipeline, _record, lambda _: None, {}, False, set)
    journal.acquire()
    server = LinkServer(
        str(tmp_path / "link.sock"),
        lambda e: pipeline.submit(_record_of(e)),
        lambda _: None,
        journal.tracker,
    )
    await server.start()
    pipeline.start()
    writer = JournalWriter(tmp_path / "j", "run1", segment_bytes=1 << 20, fsync=False)
    client = await LinkClient.connect(server.path, journal=writer)
    for n in range(5):
        client.submit(_exchange(n))
    await asyncio.sleep(0.05)
    await pipeline.flush()
    (segment,) = (tmp_path / "j").glob("*.jnl")  # still open: its worker may add to it
    marks = Path(f"{segment}{MARKS_SUFFIX}").read_text().splitlines()
    assert marks == [f"jsonl:{out}\tid-{n}" for n in range(5)]
    await client.close()  # seals it: complete and delivered, so it goes
    await server.close()
    assert list((tmp_path / "j").glob("*.jnl*")) == []
    await pipeline.close()
    journal.close()
    assert _ids(out) == [f"id-{n}" for n in range(5)]


def _record_of(exchange: Exchange) -> Any:
    from llmtally.record import TokenUsage, UsageRecord

    return UsageRecord(
        timestamp="2026-12-07T00:00:00.000Z", request_id=exchange.request_id, provider="openai",
        endpoint="chat", request_model="gpt-4o", model="gpt-4o", stream=False, status=200,
        usage=TokenUsage(), usage_source="none", cost=None, price_source="unknown_model",
        latency_ms=1.0, ttfb_ms=None, client_disconnected=False, tags={}, error=None,
    )  # fmt: skip


async def test_recovery_gives_each_sink_exactly_the_records_it_lacks(tmp_path: Path) -> None:
    # A killed run left one segment of four calls:
    #   id-0 was delivered to sink a and marked;
    #   id-1 was written to sink b, and the kill came before its mark (only b's file tail says so);
    #   id-2 sat in sink a's spill file;
    #   id-3 reached no sink.
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    b.write_bytes(render_records([_line("id-1")]))
    old = JournalWriter(tmp_path / "j", "old", segment_bytes=1 << 20, fsync=False)
    segment = Path(old.open())
    for n in range(4):
        old.append(_frame(n))
    Path(f"{segment}{MARKS_SUFFIX}").write_text(f"jsonl:{a}\tid-0\n")
    old.seal()
    pipeline = RecordPipeline([JsonLinesSink(str(a)), JsonLinesSink(str(b))], _config(tmp_path))
    pipeline.runners[0].spill.append([_line("id-2")])
    readable = {f"jsonl:{a}": a, f"jsonl:{b}": b}
    journal = RecordJournal(tmp_path / "j", "new", pipeline, _record, lambda _: None, readable, False, set)
    journal.acquire()
    stats = await journal.scan(replay_now=False)
    assert (stats.segments, stats.exchanges, stats.replayed, stats.skipped) == (1, 4, 5, 3)
    assert not segment.exists()
    pipeline.start()  # the runners replay their spill files before anything else
    await pipeline.close()
    journal.close()
    assert sorted(_ids(a)) == ["id-1", "id-2", "id-3"]
    assert sorted(_ids(b)) == ["id-0", "id-1", "id-2", "id-3"]


async def test_a_second_meter_cannot_take_a_journal_in_use(tmp_path: Path) -> None:
    pipeline = RecordPipeline([], _config(tmp_path))
    first = RecordJournal(tmp_path / "j", "one", pipeline, _record, lambda _: None, {}, False, set)
    first.acquire()
    second = RecordJournal(tmp_path / "j", "two", pipeline, _record, lambda _: None, {}, False, set)
    with pytest.raises(JournalInUse):
        second.acquire()
    first.close()
    second.acquire()
    second.close()


def test_the_tail_holds_the_last_lines_ids(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(render_records([_line(f"id-{n}", pad="x" * 5000) for n in range(100)]) + b'{"torn')
    assert tail_request_ids(path, 10) == {f"id-{n}" for n in range(91, 100)}
    assert tail_request_ids(tmp_path / "missing", 10) == set()


async def test_records_a_sink_refuses_are_settled_by_the_quarantine_and_the_rest_marked(
    tmp_path: Path,
) -> None:
    # A callback sink that refuses id-1 for ever: the runner retries it alone, then quarantines it.
    # Its neighbours are marked as delivered, id-1 as settled, and the sealed segment goes.
    taken: list[str] = []

    def callback(record: dict[str, Any]) -> None:
        if record["request_id"] == "id-1":
            raise ValueError("not this one")
        taken.append(record["request_id"])

    config = PipelineConfig(
        spill_dir=str(tmp_path / "spill"), batch_size=8, retry_attempts=2, retry_backoff_s=0.01
    )
    pipeline = RecordPipeline([CallbackSink(callback, name="hook")], config)
    journal = RecordJournal(tmp_path / "j", "run1", pipeline, _record, lambda _: None, {}, False, set)
    journal.acquire()
    server = LinkServer(
        str(tmp_path / "link.sock"), lambda e: pipeline.submit(_record_of(e)), lambda _: None, journal.tracker
    )
    await server.start()
    pipeline.start()
    writer = JournalWriter(tmp_path / "j", "run1", segment_bytes=1 << 20, fsync=False)
    client = await LinkClient.connect(server.path, journal=writer)
    for n in range(3):
        client.submit(_exchange(n))
    await client.close()
    await server.close()
    await pipeline.flush()
    for _ in range(100):  # the quarantine settles from its own thread
        if not list((tmp_path / "j").glob("*.jnl")):
            break
        await asyncio.sleep(0.01)
    assert list((tmp_path / "j").glob("*.jnl*")) == []
    assert sorted(taken) == ["id-0", "id-2"]
    kept = [
        orjson.loads(line) for line in (tmp_path / "spill" / "quarantine.jsonl").read_bytes().splitlines()
    ]
    assert [k["record"]["request_id"] for k in kept] == ["id-1"]
    await pipeline.close()
    journal.close()
