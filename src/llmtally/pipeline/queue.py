"""The record pipeline: a bounded queue, one background worker, batches to every sink.

``submit`` never blocks and never raises: metering must not hold up traffic. The worker builds
records (counting, pricing) in a thread, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from llmtally.pipeline.sinks import Sink
from llmtally.record import UsageRecord

log = logging.getLogger("llmtally.pipeline")

#: A record, or a job that builds one (run in the worker's thread).
RecordJob = UsageRecord | Callable[[], UsageRecord]


class RecordPipeline:
    def __init__(self, sinks: Sequence[Sink], max_queue: int = 10_000, batch_size: int = 256) -> None:
        self.sinks = list(sinks)
        self._queue: asyncio.Queue[RecordJob] = asyncio.Queue(max_queue)
        self._batch_size = batch_size
        self._worker: asyncio.Task[None] | None = None
        self.dropped = 0
        self.failed = 0
        self.delivered = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="llmtally-records")

    def submit(self, job: RecordJob) -> bool:
        """Queue a record; False (counted and logged) when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("record queue full (%d): record dropped (%d so far)", self._queue.maxsize, self.dropped)
            return False
        return True

    async def flush(self) -> None:
        """Wait until everything submitted so far reached the sinks."""
        if self._worker is None:
            self.start()
        await self._queue.join()

    async def close(self) -> None:
        """Deliver everything queued, stop the worker and close the sinks."""
        await self.flush()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for sink in self.sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("closing sink %s failed", sink.name)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                records = await asyncio.to_thread(_materialise, batch)
                await self._deliver(records)
            except Exception:  # pragma: no cover - _materialise guards each job
                log.exception("record batch failed")
            finally:
                for _ in batch:
                    queue.task_done()

    async def _deliver(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        for sink in self.sinks:
            try:
                await sink.write(records)
            except Exception:
                self.failed += len(records)
                log.exception("sink %s failed to write %d records", sink.name, len(records))
        self.delivered += len(records)


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
