"""The record pipeline: a bounded queue, one worker, and an independent runner per sink.

Nothing here may hold up traffic. ``submit`` never blocks and never raises; the worker builds records
(counting, pricing) in a thread and hands each batch to every sink's runner. A runner has its own
bounded queue, retries its sink with exponential backoff, and spills what still fails to a local file
that it replays later. A slow or hanging sink therefore delays only itself, and records are never lost
silently: every drop (``overflow = "drop"``), failure, spill, quarantine and loss is counted and logged.

One record never holds up another: each is rendered alone, one that cannot be JSON is quarantined
(see :mod:`llmtally.pipeline.losses`) before any sink sees it, and a batch a sink keeps refusing is
split until the records it refuses alone are found (:meth:`SinkRunner._deliver` has the rule).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtally.config import PipelineConfig
from llmtally.pipeline.losses import Losses, Quarantine, Throttle
from llmtally.pipeline.sinks import BatchRefused, RecordsRejected, Sink, check_renderable
from llmtally.pipeline.spill import SpillFile
from llmtally.pipeline.threads import SerialThread
from llmtally.record import UsageRecord
from llmtally.tasks import cancel_and_wait

log = logging.getLogger("llmtally.pipeline")

#: A record, or a job that builds one (run in the worker's thread).
RecordJob = UsageRecord | Callable[[], UsageRecord]

#: Of ``close_timeout_s``, the part kept for saving what is still undelivered and closing the sinks.
SAVE_SHARE = 0.25
SAVE_MAX_S = 5.0


@dataclass
class PipelineStats:
    """Counters for metrics; per sink where it applies (quarantined and lost: per sink and reason)."""

    dropped: int = 0
    delivered: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    spilled: Counter[str] = field(default_factory=Counter)
    replayed: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[tuple[str, str]] = field(default_factory=Counter)
    lost: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass
class _Bisected:
    """What splitting a refused batch found."""

    some_delivered: bool = False
    #: Records the sink refused on their own: quarantined (the sink takes others, not these).
    refused_alone: list[dict[str, Any]] = field(default_factory=list)
    #: Records whose part failed otherwise (down, hung): that says nothing about them, so they spill.
    unsure: list[dict[str, Any]] = field(default_factory=list)


def default_spill_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "llmtally-spill")


class SinkRunner:
    """Delivers batches to one sink: retry with backoff, then spill, replay later."""

    def __init__(
        self,
        sink: Sink,
        config: PipelineConfig,
        spill_dir: Path,
        stats: PipelineStats,
        quarantine: Quarantine,
        losses: Losses,
    ) -> None:
        self.sink = sink
        self._config = config
        self._stats = stats
        self._quarantine = quarantine
        self._losses = losses
        self._throttle = Throttle()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sink.name)
        self.spill = SpillFile(spill_dir / f"{safe}.jsonl")
        # Spill file I/O on its own thread: a hung disk holds up this sink only, and never the exit.
        self._io = SerialThread(f"spill-{safe}")
        self._queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(config.sink_queue)
        self._task: asyncio.Task[None] | None = None
        self._spilling: set[asyncio.Task[bool]] = set()
        #: The batch being delivered: saved to the spill file if the runner is stopped mid-way.
        self._current: list[dict[str, Any]] | None = None
        #: Splitting the last refused batch got nothing through: do not split the next ones (a receiver
        #: that refuses everything would cost a write per record). Cleared by any record delivered.
        self._down = False
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
            self._throttle.log(
                ("behind",), logging.WARNING, "sink %s is behind: %d records spilled to %s",
                self.sink.name, len(batch), self.spill.path,
            )  # fmt: skip
            task = asyncio.get_running_loop().create_task(self._spill(batch))
            self._spilling.add(task)
            task.add_done_callback(self._spilling.discard)

    async def _spill(self, records: list[dict[str, Any]], *, replaying: bool = False) -> bool:
        """Append to this sink's spill file; True once on disk. Not on disk: counted lost, unless
        ``replaying`` (they are still in the replay file then)."""
        if not records:
            return True
        try:
            unrenderable = await self._io.run(self.spill.append, records)
        except Exception as exc:  # OSError mostly: disk full, spill dir unusable
            if not replaying:
                self._losses.count(self.sink.name, "spill failed", len(records), exc)
            return False
        await self._quarantine.put(unrenderable, self.sink.name, "unrenderable")
        if not replaying:
            self._stats.spilled[self.sink.name] += len(records) - len(unrenderable)
        return True

    async def _run(self) -> None:
        await self._safe_replay()  # records spilled by a previous run
        interval = self._config.replay_interval_s
        while True:
            try:
                batch = await asyncio.wait_for(self._queue.get(), interval)
            except TimeoutError:
                await self._safe_replay()
                continue
            self._current = batch
            try:
                left = await self._deliver(batch)
                if left:
                    self._stats.failed[self.sink.name] += len(left)
                    if await self._spill(left):  # (a failed spill logs its loss instead)
                        self._throttle.log(
                            ("failed",), logging.ERROR,
                            "sink %s failed %d records after retries: spilled to %s",
                            self.sink.name, len(left), self.spill.path,
                        )  # fmt: skip
            except Exception:  # pragma: no cover - a bug here must not stop this sink for good
                log.exception("sink %s: delivering a batch failed", self.sink.name)
            finally:
                self._current = None
                self._queue.task_done()

    async def _safe_replay(self) -> None:
        try:
            await self.replay()
        except Exception as exc:  # e.g. the spill dir is unusable: the records there wait
            self._throttle.log(
                ("replay",), logging.ERROR, "sink %s: replaying %s failed: %s: %s",
                self.sink.name, self.spill.path, type(exc).__name__, exc,
            )  # fmt: skip

    async def _write_once(self, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Exception | None]:
        """One bounded write: the records it did not take, and why."""
        try:
            await asyncio.wait_for(self.sink.write(batch), self._config.sink_timeout_s)
        except RecordsRejected as exc:
            left: list[dict[str, Any]] = exc.records
            error: Exception | None = exc
        except Exception as exc:
            left, error = batch, exc
        else:
            left, error = [], None
        if len(left) < len(batch):
            self._stats.delivered[self.sink.name] += len(batch) - len(left)
            self._down = False
        return left, error

    async def _deliver(self, batch: list[dict[str, Any]], *, probe: bool = False) -> list[dict[str, Any]]:
        """Write a batch, retrying with backoff; returns the records to spill (the sink is down).

        The rule, after the retries:

        - a sink that failed (unreachable, an error status, a full disk) or hung is down: the batch
          spills whole and is replayed later; a failure says nothing about the records;
        - records a sink names as refused (``RecordsRejected``, e.g. a callback raising for them) are
          quarantined, when the sink took some record of the batch (else it may be down: they spill);
        - a batch the receiver refused (``BatchRefused``, e.g. a webhook's 400) is split in halves,
          each written once, down to single records: if any part got through, the records refused on
          their own are quarantined and the rest are delivered; if none did, the batch spills (the
          receiver refuses everything, which is not the records' fault) and until some record gets
          through later batches spill without splitting. ``probe`` (a replay) splits regardless, so
          one refused record cannot hold a spill file back for ever.
        """
        config = self._config
        left, error = batch, None
        some_delivered = False
        for attempt in range(config.retry_attempts):
            before = len(left)
            left, error = await self._write_once(left)
            some_delivered |= len(left) < before
            if not left:
                return []
            if isinstance(error, RecordsRejected) and error.permanent:
                # (with the sink's own reason for the first of them, when it gave one)
                await self._quarantine.put(left, self.sink.name, error.reason, error.__cause__)
                return []
            delay = min(config.retry_backoff_s * 2**attempt, config.retry_backoff_max_s)
            self._throttle.log(
                ("retry",), logging.WARNING,
                "sink %s write failed (attempt %d/%d: %s: %s); retrying in %.2f s",
                self.sink.name, attempt + 1, config.retry_attempts, type(error).__name__, error, delay,
            )  # fmt: skip
            if attempt + 1 < config.retry_attempts:
                await asyncio.sleep(delay)
        if isinstance(error, RecordsRejected) and some_delivered:
            await self._quarantine.put(left, self.sink.name, "rejected", error)
            return []
        if not isinstance(error, BatchRefused) or (self._down and not probe) or len(left) == 1:
            return left
        found = await self._bisect(left)
        if not (found.some_delivered or some_delivered):
            self._down = True
            return left
        await self._quarantine.put(found.refused_alone, self.sink.name, "rejected", error)
        return found.unsure

    async def _bisect(self, batch: list[dict[str, Any]]) -> _Bisected:
        found = _Bisected()
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            left, error = await self._write_once(part)
            found.some_delivered |= len(left) < len(part)
            if not left:
                continue
            if isinstance(error, RecordsRejected) or (isinstance(error, BatchRefused) and len(left) == 1):
                found.refused_alone += left
            elif isinstance(error, BatchRefused):
                deeper = await self._bisect(left)
                found.some_delivered |= deeper.some_delivered
                found.refused_alone += deeper.refused_alone
                found.unsure += deeper.unsure
            else:  # down or hung half-way through: these are not judged, they spill
                found.unsure += left
        return found

    async def replay(self) -> bool:
        """Try spilled records again; True when none are left."""
        async with self._replay_lock:
            return await self._replay()

    async def _replay(self) -> bool:
        if not await self._io.run(self.spill.has_records):
            return True
        records = await self._io.run(self.spill.take)
        size = self._config.batch_size
        for start in range(0, len(records), size):
            batch = records[start : start + size]
            left = await self._deliver(batch, probe=True)
            if left:
                if start == 0 and len(left) == len(batch):
                    return False  # no progress (still down): the replay file stays as it is
                # Progress: what is left goes back to the spill file (delivered batches are not sent
                # again); if even that fails, the replay file stays and is taken whole next time.
                self._stats.replayed[self.sink.name] += start + len(batch) - len(left)
                if await self._spill(left + records[start + size :], replaying=True):
                    await self._io.run(self.spill.done)
                return False
        await self._io.run(self.spill.done)
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

    def undelivered(self) -> list[dict[str, Any]]:
        """After ``stop``: the batch that was being written and everything still queued (taken out)."""
        pending = list(self._current or [])
        self._current = None
        while not self._queue.empty():
            pending += self._queue.get_nowait()
            self._queue.task_done()
        return pending

    async def save(self, records: list[dict[str, Any]]) -> None:
        """At shutdown: ``records`` and the spills still being written, to disk (or counted lost)."""
        if self._spilling:
            await asyncio.gather(*self._spilling, return_exceptions=True)
        await self._spill(records)


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
        self.losses = Losses(self.stats.lost)
        self.quarantine = Quarantine(self.spill_dir, self.stats.quarantined, self.losses)
        self._queue: asyncio.Queue[RecordJob] | None = None
        self._runners = [self._runner_for(s) for s in self.sinks]
        self._overflow = SpillFile(self.spill_dir / "overflow.jsonl")
        self._overflowing: set[asyncio.Future[None]] = set()
        self._reingest_lock: asyncio.Lock | None = None
        self._worker: asyncio.Task[None] | None = None
        #: The jobs the worker is building: built again and saved if it is stopped mid-way.
        self._building: list[RecordJob] | None = None
        self._throttle = Throttle()

    def _runner_for(self, sink: Sink) -> SinkRunner:
        return SinkRunner(sink, self.config, self.spill_dir, self.stats, self.quarantine, self.losses)

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
        runner = self._runner_for(sink)
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
            self._throttle.log(
                ("dropped",), logging.ERROR, "record queue full (%d): record dropped (%d so far)",
                self.config.max_queue, self.stats.dropped,
            )  # fmt: skip
            return False
        # Spill: build the record in a thread and append it to the overflow file, re-read later.
        future = asyncio.get_running_loop().run_in_executor(None, self._spill_jobs, [job])
        self._overflowing.add(future)
        future.add_done_callback(self._overflowing.discard)
        return False

    def _spill_jobs(self, jobs: list[RecordJob]) -> None:
        """Build records and append them to the overflow file (blocking: from a thread)."""
        records, unrenderable = _materialise(jobs)
        self.quarantine.put_now(unrenderable, "pipeline", "unrenderable")
        try:
            self.quarantine.put_now(self._overflow.append(records), "overflow", "unrenderable")
        except Exception as exc:  # OSError mostly: disk full, spill dir unusable
            self.losses.count("overflow", "spill failed", len(records), exc)
            return
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

    async def replay(self) -> bool:
        """Try every sink's spilled records now (as the runners do every ``replay_interval_s``); True
        when none are left."""
        done = await asyncio.gather(*(runner.replay() for runner in self._runners), return_exceptions=True)
        return all(result is True for result in done)

    async def close(self) -> None:
        """Deliver everything queued and retry what is spilled, within ``close_timeout_s``; then save
        what is left to the spill files (counted lost if even that fails), stop, close the sinks."""
        budget = self.config.close_timeout_s
        save_s = min(budget * SAVE_SHARE, SAVE_MAX_S)
        try:
            async with asyncio.timeout(budget - save_s):
                await self.flush()
                await self.replay()
        except TimeoutError:
            log.error(
                "records not all delivered within close_timeout_s (%.1f s): the rest stay in %s",
                budget, self.spill_dir,
            )  # fmt: skip
        await self._stop_and_save(save_s)
        left = {r.sink.name: str(r.spill.path) for r in self._runners if _has_records(r.spill)}
        if left:
            log.warning("records still undelivered, kept for the next start: %s", left)

    async def _stop_and_save(self, within_s: float) -> None:
        await cancel_and_wait(self._worker)
        self._worker = None
        jobs = list(self._building or [])
        self._building = None
        while self._queue is not None and not self._queue.empty():
            jobs.append(self._queue.get_nowait())
            self._queue.task_done()
        saves: list[Any] = [asyncio.gather(*self._overflowing, return_exceptions=True)]
        if jobs:
            saves.append(asyncio.get_running_loop().run_in_executor(None, self._spill_jobs, jobs))
        for runner in self._runners:
            await runner.stop()
            saves.append(runner.save(runner.undelivered()))
        try:
            async with asyncio.timeout(within_s):
                await asyncio.gather(*saves, return_exceptions=True)
        except TimeoutError:
            log.error("saving undelivered records at shutdown took over %.1f s: some may be lost", within_s)
        for runner in self._runners:
            try:
                async with asyncio.timeout(max(within_s, 1.0)):
                    await runner.sink.close()
            except Exception:
                log.exception("closing sink %s failed", runner.sink.name)

    async def _reingest_overflow(self) -> None:
        if self._reingest_lock is None:
            self._reingest_lock = asyncio.Lock()
        async with self._reingest_lock:  # taken twice, the same records would be delivered twice
            if await asyncio.to_thread(_has_records, self._overflow):
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
        try:
            await self._reingest_overflow()  # records spilled by a previous run
        except Exception as exc:  # the spill dir is unusable: those records wait there
            log.error("reading %s failed: %s: %s", self._overflow.path, type(exc).__name__, exc)
        while True:
            batch = [await queue.get()]
            while len(batch) < self.config.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            self._building = batch
            try:
                records, unrenderable = await asyncio.to_thread(_materialise, batch)
                self._building = None
                self._fan_out(records)
                await self.quarantine.put(unrenderable, "pipeline", "unrenderable")
            except Exception:  # pragma: no cover - _materialise guards each job
                self._building = None
                log.exception("record batch failed")
            finally:  # not clearing _building: cancelled mid-build, close() builds and saves them
                for _ in batch:
                    queue.task_done()


def _has_records(spill: SpillFile) -> bool:
    try:
        return spill.has_records()
    except OSError:
        return False


def _materialise(batch: list[RecordJob]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build each record: (the records, those that cannot be rendered as JSON, for the quarantine)."""
    out, unrenderable = [], []
    for job in batch:
        try:
            record = job if isinstance(job, UsageRecord) else job()
        except Exception:
            log.exception("building a usage record failed")
            continue
        as_dict = record.to_dict()
        try:
            check_renderable(as_dict)  # what every JSON sink and the spill would refuse: refused here, once
        except (TypeError, ValueError):
            unrenderable.append(as_dict)
            continue
        out.append(as_dict)
    return out, unrenderable
