"""The record pipeline: a bounded queue, one worker, and an independent runner per sink.

Nothing here may hold up traffic. ``submit`` never blocks and never raises; the worker builds records
(counting, pricing) in a thread and hands each batch to every sink's runner. A runner has its own
bounded queue, retries its sink with exponential backoff, and spills what still fails to a local file
that it replays later. A slow or hanging sink therefore delays only itself, and records are never lost
silently: every drop (``overflow = "drop"``), failure and spill is counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtally.config import PipelineConfig
from llmtally.pipeline.sinks import Sink
from llmtally.pipeline.spill import SpillFile
from llmtally.record import UsageRecord
from llmtally.tasks import cancel_and_wait

log = logging.getLogger("llmtally.pipeline")

#: A record, or a job that builds one (run in the worker's thread).
RecordJob = UsageRecord | Callable[[], UsageRecord]


@dataclass
class PipelineStats:
    """Counters for metrics; per sink where it applies."""

    dropped: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    spilled: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)


def default_spill_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "llmtally-spill")


class SinkRunner:
    """Delivers batches to one sink: retry with backoff, then spill, replay later."""

    def __init__(self, sink: Sink, config: PipelineConfig, spill_dir: Path, stats: PipelineStats) -> None:
        self.sink = sink
        self._config = config
        self._stats = stats
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sink.name)
        self.spill = SpillFile(spill_dir / f"{safe}.jsonl")
        self._queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(config.sink_queue)
        self._task: asyncio.Task[None] | None = None
        self._spilling: set[asyncio.Task[None]] = set()
        # One replay at a time: two would both take the same spill file and deliver it twice.
        self._replay_lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"llmtally-sink-{self.sink.name}"
        )

    def offer(self, batch: list[dict[str, Any]]) -> None:
        """Queue a batch; when the sink is this far behind, spill it instead (never wait)."""
        try:
            self._queue.put_nowait(batch)
        except asyncio.QueueFull:
            log.warning(
                "sink %s is behind: %d records spilled to %s", self.sink.name, len(batch), self.spill.path
            )
            task = asyncio.get_running_loop().create_task(self._spill(batch))
            self._spilling.add(task)
            task.add_done_callback(self._spilling.discard)

    async def _spill(self, batch: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self.spill.append, batch)
        self._stats.spilled[self.sink.name] += len(batch)

    async def _run(self) -> None:
        interval = self._config.replay_interval_s
        while True:
            try:
                batch = await asyncio.wait_for(self._queue.get(), interval)
            except TimeoutError:
                await self.replay()
                continue
            try:
                if not await self._try(batch):
                    self._stats.failed[self.sink.name] += len(batch)
                    log.error("sink %s failed %d records after retries: spilled", self.sink.name, len(batch))
                    await self._spill(batch)
            finally:
                self._queue.task_done()

    async def _try(self, batch: list[dict[str, Any]]) -> bool:
        config = self._config
        for attempt in range(config.retry_attempts):
            try:
                await asyncio.wait_for(self.sink.write(batch), config.sink_timeout_s)
            except Exception as exc:
                delay = min(config.retry_backoff_s * 2**attempt, config.retry_backoff_max_s)
                log.warning(
                    "sink %s write failed (attempt %d/%d: %s: %s); retrying in %.2f s",
                    self.sink.name, attempt + 1, config.retry_attempts, type(exc).__name__, exc, delay,
                )  # fmt: skip
                if attempt + 1 < config.retry_attempts:
                    await asyncio.sleep(delay)
                continue
            self._stats.delivered[self.sink.name] += len(batch)
            return True
        return False

    async def replay(self) -> bool:
        """Try spilled records again; True when none are left."""
        async with self._replay_lock:
            return await self._replay()

    async def _replay(self) -> bool:
        if not await asyncio.to_thread(self.spill.has_records):
            return True
        records = await asyncio.to_thread(self.spill.take)
        for start in range(0, len(records), self._config.batch_size):
            if not await self._try(records[start : start + self._config.batch_size]):
                # Deliver the rest later; already-delivered batches carry idempotency keys.
                return False
        await asyncio.to_thread(self.spill.done)
        self._stats.replayed[self.sink.name] += len(records)
        log.info("sink %s: %d spilled records delivered", self.sink.name, len(records))
        return True

    async def flush(self) -> None:
        await self._queue.join()
        if self._spilling:
            await asyncio.gather(*self._spilling)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


class RecordPipeline:
    def __init__(
        self,
        sinks: Sequence[Sink],
        config: PipelineConfig | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        self.sinks = list(sinks)
        self.stats = PipelineStats()
        self.spill_dir = Path(self.config.spill_dir or default_spill_dir())
        self._queue: asyncio.Queue[RecordJob] | None = None
        self._runners = [SinkRunner(s, self.config, self.spill_dir, self.stats) for s in self.sinks]
        self._overflow = SpillFile(self.spill_dir / "overflow.jsonl")
        self._overflowing: set[asyncio.Future[None]] = set()
        self._reingest_lock: asyncio.Lock | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def runners(self) -> list[SinkRunner]:
        """One per sink, in sink order (the journal's crash recovery reaches their spill files)."""
        return self._runners

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        if self._worker is not None:
            return
        self._queue = asyncio.Queue(self.config.max_queue)
        for runner in self._runners:
            runner.start()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="llmtally-records")

    def add_sink(self, sink: Sink) -> None:
        """Add a sink to a running pipeline (it receives records submitted from now on)."""
        runner = SinkRunner(sink, self.config, self.spill_dir, self.stats)
        self.sinks.append(sink)
        self._runners.append(runner)
        if self._worker is not None:
            runner.start()

    def submit(self, job: RecordJob) -> bool:
        """Queue a record (never blocks, never raises). False when it overflowed (spilled or dropped)."""
        if self._queue is None:
            self.start()
        assert self._queue is not None
        try:
            self._queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            pass
        if self.config.overflow == "drop":
            self.stats.dropped += 1
            log.error(
                "record queue full (%d): record dropped (%d so far)",
                self.config.max_queue,
                self.stats.dropped,
            )
            return False
        # Spill: build the record in a thread and append it to the overflow file, re-read later.
        future = asyncio.get_running_loop().run_in_executor(None, self._spill_job, job)
        self._overflowing.add(future)
        future.add_done_callback(self._overflowing.discard)
        return False

    def _spill_job(self, job: RecordJob) -> None:
        records = _materialise([job])
        self._overflow.append(records)
        self.stats.spilled["overflow"] += len(records)

    async def flush(self) -> None:
        """Deliver everything submitted so far (spilled overflow included) to every sink's runner."""
        if self._queue is None:
            self.start()
        assert self._queue is not None
        while True:
            if self._overflowing:
                await asyncio.gather(*self._overflowing, return_exceptions=True)
            await self._queue.join()
            await self._reingest_overflow()
            for runner in self._runners:
                await runner.flush()
            if not self._overflowing and self._queue.empty():
                break

    async def close(self) -> None:
        """Deliver everything queued, retry what is spilled once, stop, close the sinks."""
        await self.flush()
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.replay()
        await cancel_and_wait(self._worker)
        self._worker = None
        for runner in self._runners:
            await runner.stop()
            try:
                await runner.sink.close()
            except Exception:
                log.exception("closing sink %s failed", runner.sink.name)
        left = {r.sink.name: r.spill.path for r in self._runners if r.spill.has_records()}
        if left:
            log.warning("records still undelivered, kept for the next start: %s", left)

    async def _reingest_overflow(self) -> None:
        if self._reingest_lock is None:
            self._reingest_lock = asyncio.Lock()
        async with self._reingest_lock:  # taken twice, the same records would be delivered twice
            if await asyncio.to_thread(self._overflow.has_records):
                records = await asyncio.to_thread(self._overflow.take)
                self._fan_out(records)
                await asyncio.to_thread(self._overflow.done)

    def _fan_out(self, records: list[dict[str, Any]]) -> None:
        for start in range(0, len(records), self.config.batch_size):
            batch = records[start : start + self.config.batch_size]
            for runner in self._runners:
                runner.offer(batch)

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        await self._reingest_overflow()  # records spilled by a previous run
        for runner in self._runners:
            await runner.replay()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.config.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                records = await asyncio.to_thread(_materialise, batch)
                self._fan_out(records)
            except Exception:  # pragma: no cover - _materialise guards each job
                log.exception("record batch failed")
            finally:
                for _ in batch:
                    queue.task_done()


def _materialise(batch: list[RecordJob]) -> list[dict[str, Any]]:
    out = []
    for job in batch:
        try:
            record = job if isinstance(job, UsageRecord) else job()
        except Exception:
            log.exception("building a usage record failed")
            continue
        out.append(record.to_dict())
    return out
