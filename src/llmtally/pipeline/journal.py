"""The exchange journal: after a SIGKILL, every finished call still gets exactly one record per sink.

Under ``llmtally serve`` a call's exchange lives, until its record is delivered, in a proxy worker's
5 ms link buffer, in the socket, then in the record process's queue: a SIGKILL of either process
loses it. So each worker also appends every exchange frame to its own journal *segment* (one
``write`` with ``O_APPEND``, in the callback that sent the client its last byte, no fsync unless
``journal_fsync``: the page cache survives the death of a process, not of the machine).

The record process keeps the journal's books:

* the link tells it which segment each exchange came from (:class:`SegmentOpened`,
  :class:`SegmentSealed` travel in order with the frames);
* every durable sink is wrapped in a :class:`MarkingSink`, which appends ``sink<TAB>request_id``
  to the segment's ``.done`` file right after the sink's write returned;
* a sealed segment whose exchanges all arrived and are all delivered to every durable sink is deleted
  (with its marks): the journal holds only what is still on its way.

At start (before new traffic) and every second, segments no live writer holds are recovered:

* from a previous run (another ``run`` in the name): each exchange's record is built again (same
  ``request_id``) and appended to the spill file of every sink that does not have it yet, the runners
  replay spill files first; "has it" = a mark, or in that sink's spill file, or in the pipeline's
  overflow file, or, for a file sink, among the lines written since its last mark (the tail);
* from this run (a worker died): the exchanges that never arrived over the link are submitted.

Records are money: anything unreadable is logged and skipped, never raised into traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pickle
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from llmtally.pipeline.sinks import RecordsRejected
from llmtally.pipeline.spill import read_records

if TYPE_CHECKING:
    from llmtally.exchange import Exchange
    from llmtally.pipeline.queue import RecordPipeline
    from llmtally.pipeline.sinks import Sink

log = logging.getLogger("llmtally.journal")

SEGMENT_SUFFIX = ".jnl"
MARKS_SUFFIX = ".done"
#: The record process holds this file locked: one meter per journal directory.
OWNER_LOCK = "owner.lock"
#: Frames as on the link: a 4-byte big-endian length and a pickle.
_HEADER = struct.Struct(">I")
#: How often the record process looks for segments whose writer died.
SCAN_INTERVAL_S = 1.0


class JournalInUse(RuntimeError):
    """Another running meter owns the journal directory."""


@dataclass(frozen=True, slots=True)
class SegmentOpened:
    """A worker started a segment: the exchanges that follow on its link are journaled in it."""

    path: str


@dataclass(frozen=True, slots=True)
class SegmentSealed:
    """A worker closed a segment after ``frames`` exchanges (all sent on the link before this)."""

    path: str
    frames: int


@dataclass(frozen=True, slots=True)
class SegmentName:
    """``<run>-<pid>-<seq>.jnl``: which ``llmtally serve`` run and which worker process wrote it."""

    run: str
    pid: int

    @classmethod
    def parse(cls, path: Path) -> SegmentName | None:
        parts = path.name.removesuffix(SEGMENT_SUFFIX).split("-")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]))


def new_run_id() -> str:
    """Tells this run's segments from those a killed run left (no ``-`` in it: see SegmentName)."""
    return f"{time.time_ns():x}{os.getpid():x}"


# The worker's side ------------------------------------------------------------------------------


class JournalWriter:
    """One worker's journal: append-only segments, each locked (flock) while this process writes it."""

    def __init__(self, directory: Path, run: str, segment_bytes: int, fsync: bool) -> None:
        self.directory = directory
        self._run = run
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._fd: int | None = None
        self.path: str | None = None
        self._size = 0
        self.frames = 0
        self._seq = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def full(self) -> bool:
        return self._size >= self._segment_bytes

    def open(self) -> str:
        """Start a segment; its path. Locked before it has its final name, so the record process,
        which looks only at ``*.jnl``, never takes a segment a live worker is about to write."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{self._run}-{os.getpid()}-{self._seq}"
        temp = self.directory / f"{name}.new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = self.directory / f"{name}{SEGMENT_SUFFIX}"
        os.rename(temp, path)
        self._fd, self.path, self._size, self.frames = fd, str(path), 0, 0
        return self.path

    def append(self, frame: bytes) -> None:
        """One ``write`` (O_APPEND): in the page cache once it returns, whatever becomes of us."""
        assert self._fd is not None
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view) :]
        if self._fsync:
            os.fsync(self._fd)
        self._size += len(frame)
        self.frames += 1

    def seal(self) -> tuple[str, int]:
        """Close the segment (its lock goes with it); its path and frame count."""
        fd, path = self._fd, self.path
        assert fd is not None and path is not None
        self._fd = self.path = None
        os.close(fd)
        return path, self.frames


# Reading segments back --------------------------------------------------------------------------


def read_segment(path: Path) -> list[tuple[Any, ...]]:
    """The wire tuples in a segment, in order; a torn last frame (killed mid-write) is left out."""
    data = path.read_bytes()
    out: list[tuple[Any, ...]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        (size,) = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + size
        if end > len(data):
            log.warning("%s: torn last frame (%d bytes) skipped", path, len(data) - offset)
            break
        try:
            message = pickle.loads(data[offset + _HEADER.size : end])
        except Exception:
            log.exception("%s: unreadable frame at byte %d skipped", path, offset)
        else:
            if isinstance(message, tuple):
                out.append(message)
        offset = end
    return out


def read_marks(path: Path) -> dict[str, set[str]]:
    """Sink name → the request ids it has (from a segment's ``.done`` file)."""
    marks: dict[str, set[str]] = {}
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
        for line in fh:
            sink, tab, request_id = line.rstrip(b"\n").decode("utf-8", "replace").partition("\t")
            if tab and request_id:  # a torn last line has no id yet
                marks.setdefault(sink, set()).add(request_id)
    return marks


def tail_request_ids(path: Path, lines: int) -> set[str]:
    """The request ids among the last ``lines`` JSON lines of a record file (backwards, in blocks)."""
    found: set[str] = set()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return found
    with fh:
        end = fh.seek(0, os.SEEK_END)
        data = b""
        block = 1 << 16
        while end > 0 and data.count(b"\n") <= lines:
            start = max(0, end - block)
            fh.seek(start)
            data = fh.read(end - start) + data
            end = start
    for line in data.splitlines()[-lines:]:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            request_id = orjson.loads(line).get("request_id")
            if isinstance(request_id, str):
                found.add(request_id)
    return found


def _spilled_ids(paths: Iterable[Path]) -> set[str]:
    ids: set[str] = set()
    for path in paths:
        if path.exists():
            ids.update(str(r.get("request_id")) for r in read_records(path))
    return ids


def _try_lock(path: Path) -> int | None:
    """An fd holding the segment's lock, or None while its writer lives (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _remove(segment: Path) -> None:
    segment.unlink(missing_ok=True)
    Path(f"{segment}{MARKS_SUFFIX}").unlink(missing_ok=True)


# The record process's side ----------------------------------------------------------------------


@dataclass
class _Segment:
    path: Path
    received: int = 0
    #: Known once the worker sealed the segment (or the record process adopted it).
    frames: int | None = None
    #: Request ids not yet delivered to every durable sink.
    pending: set[str] = field(default_factory=set)
    marks: IO[bytes] | None = None


class JournalTracker:
    """What each of this run's segments holds, what of it arrived and what is delivered."""

    def __init__(self, durable_sinks: Iterable[str], fsync: bool) -> None:
        self.durable = frozenset(durable_sinks)
        self._fsync = fsync
        self.segments: dict[str, _Segment] = {}
        #: request id → its segment and the durable sinks still to deliver it.
        self._left: dict[str, tuple[_Segment, set[str]]] = {}
        self.deleted = 0

    def opened(self, path: str) -> None:
        self.segments.setdefault(path, _Segment(Path(path)))

    def received(self, path: str, request_id: str) -> None:
        segment = self.segments.get(path)
        if segment is None:
            return
        segment.received += 1
        if self.durable:
            segment.pending.add(request_id)
            self._left[request_id] = (segment, set(self.durable))

    def sealed(self, path: str, frames: int) -> None:
        segment = self.segments.get(path)
        if segment is not None:
            segment.frames = frames
            self._maybe_done(segment)

    def complete(self, path: str) -> bool:
        """Sealed, and every exchange in it arrived (delivery may still be under way)."""
        segment = self.segments.get(path)
        return segment is not None and segment.frames is not None and segment.received >= segment.frames

    def received_count(self, path: str) -> int:
        segment = self.segments.get(path)
        return segment.received if segment is not None else 0

    def delivered(self, sink: str, records: list[dict[str, Any]]) -> None:
        """``sink`` wrote ``records``: mark them, and delete segments nothing is left pending in."""
        lines: dict[str, list[bytes]] = {}
        touched: dict[str, _Segment] = {}
        for record in records:
            request_id = record.get("request_id")
            if not isinstance(request_id, str):
                continue
            entry = self._left.get(request_id)
            if entry is None or sink not in entry[1]:
                continue
            segment, sinks = entry
            key = str(segment.path)
            lines.setdefault(key, []).append(f"{sink}\t{request_id}\n".encode())
            touched[key] = segment
            sinks.discard(sink)
            if not sinks:
                del self._left[request_id]
                segment.pending.discard(request_id)
        for key, segment in touched.items():
            if segment.pending or not self.complete(key):
                self._write_marks(segment, lines[key])
            self._maybe_done(segment)

    def settled(self, sink: str, records: list[dict[str, Any]]) -> None:
        """``records`` were quarantined for ``sink`` (for every sink when the pipeline itself, or the
        overflow file, could not render them)."""
        for name in self.durable if sink not in self.durable else (sink,):
            self.delivered(name, records)

    def _write_marks(self, segment: _Segment, lines: list[bytes]) -> None:
        try:
            if segment.marks is None:
                segment.marks = open(f"{segment.path}{MARKS_SUFFIX}", "ab")  # noqa: SIM115
            segment.marks.write(b"".join(lines))
            segment.marks.flush()
            if self._fsync:
                os.fsync(segment.marks.fileno())
        except OSError as exc:  # a missing mark costs a duplicate after a crash, never a record
            log.error("journal marks for %s not written: %s", segment.path, exc)

    def _maybe_done(self, segment: _Segment) -> None:
        key = str(segment.path)
        if segment.pending or not self.complete(key):
            return
        self._drop(key)

    def _drop(self, key: str) -> None:
        segment = self.segments.pop(key)
        if segment.marks is not None:
            segment.marks.close()
        _remove(segment.path)
        self.deleted += 1

    def finish(self) -> None:
        """After the pipeline closed (everything received is delivered or in a spill file): drop
        every complete segment; the others keep what never arrived, for the next start."""
        for key in list(self.segments):
            if self.complete(key):
                self._drop(key)
            else:
                segment = self.segments.pop(key)
                if segment.marks is not None:
                    segment.marks.close()
        self._left.clear()


class MarkingSink:
    """A sink whose deliveries are marked in the journal right after each write.

    Writes are serialised (a runner's replay and its live batches could overlap): so at most one
    batch per sink is ever written and not yet marked, which is what the tail check at recovery covers.
    """

    def __init__(self, sink: Sink, tracker: JournalTracker) -> None:
        self.name = sink.name
        self.inner = sink
        self._tracker = tracker
        self._lock = asyncio.Lock()

    async def write(self, records: list[dict[str, Any]]) -> None:
        async with self._lock:
            try:
                await self.inner.write(records)
            except RecordsRejected as exc:  # the others were written: mark them
                refused = {id(r) for r in exc.records}
                self._tracker.delivered(self.name, [r for r in records if id(r) not in refused])
                raise
            self._tracker.delivered(self.name, records)

    async def close(self) -> None:
        await self.inner.close()


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    segments: int = 0
    exchanges: int = 0
    #: (sink, record) pairs appended to spill files, or submitted (this run's dead workers).
    replayed: int = 0
    #: (sink, record) pairs a sink already had.
    skipped: int = 0


class RecordJournal:
    """The record process's journal: the owner lock, the books, the marks and the recovery."""

    def __init__(
        self,
        directory: Path,
        run: str,
        pipeline: RecordPipeline,
        build: Callable[[Exchange], dict[str, Any]],
        submit: Callable[[Exchange], None],
        readable: Mapping[str, Path],
        fsync: bool,
        live_pids: Callable[[], set[int]],
    ) -> None:
        """``readable``: sink name → the file it appends JSON lines to (its tail can be checked).
        ``live_pids``: the worker processes whose link is still open (their segments are theirs)."""
        from llmtally.pipeline.prometheus import PrometheusSink

        self.directory = directory
        self.run = run
        self._pipeline = pipeline
        self._build = build
        self._submit = submit
        self._readable = dict(readable)
        self._live_pids = live_pids
        self._owner: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        # Prometheus counters die with the process: nothing durable to mark; a replay counts anew.
        durable = [r for r in pipeline.runners if not isinstance(r.sink, PrometheusSink)]
        self.tracker = JournalTracker([r.sink.name for r in durable], fsync)
        for runner in durable:
            runner.sink = MarkingSink(runner.sink, self.tracker)
        # A quarantined record is settled (kept aside, never retried): mark it as such, or its segment
        # would stay for the whole run and the next start would quarantine it again.
        loop = asyncio.get_running_loop()
        pipeline.quarantine.listeners.append(
            lambda sink, records: loop.call_soon_threadsafe(self.tracker.settled, sink, records)
        )
        self.recovered = RecoveryStats()

    def acquire(self) -> None:
        """Own the directory, or raise :class:`JournalInUse`."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalInUse(
                f"the journal directory {self.directory} belongs to another running llmtally "
                "(set [pipeline] journal_dir, or stop the other one)"
            ) from None
        self._owner = fd

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._scan_forever(), name="llmtally-journal")

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(SCAN_INTERVAL_S)
            try:
                await self.scan(replay_now=True)
            except Exception:
                log.exception("journal scan failed")

    async def stop(self) -> None:
        """Stop scanning, then take in what dead workers left (before the pipeline closes)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.scan(replay_now=False)

    def close(self) -> None:
        """After the pipeline closed."""
        self.tracker.finish()
        if self._owner is None:
            return
        if not any(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            # Nothing left to replay: no empty journal-<port> directory per port ever used.
            (self.directory / OWNER_LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.directory.rmdir()
        os.close(self._owner)
        self._owner = None

    async def scan(self, replay_now: bool) -> RecoveryStats:
        """Recover every segment no live worker owns. ``replay_now``: the pipeline is running, so
        have the runners deliver what was appended to their spill files now rather than when idle."""
        async with self._scan_lock:
            total = RecoveryStats()
            spilled_to: set[int] = set()
            live = self._live_pids()
            for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
                name = SegmentName.parse(path)
                if name is None:
                    continue
                if name.run == self.run:
                    if name.pid in live or self.tracker.complete(str(path)):
                        continue  # its worker will send (or sent) every frame
                    stats = await self._adopt(path)
                else:
                    fd = _try_lock(path)
                    if fd is None:
                        continue  # a worker of the killed run is still draining its calls
                    try:
                        stats = await asyncio.to_thread(self._recover, path, spilled_to)
                    finally:
                        os.close(fd)
                total = _add(total, stats)
            if total.segments:
                log.warning(
                    "journal: %d segments recovered, %d exchanges: %d records replayed, "
                    "%d already delivered",
                    total.segments, total.exchanges, total.replayed, total.skipped,
                )  # fmt: skip
                self.recovered = _add(self.recovered, total)
            if replay_now:
                for index in sorted(spilled_to):
                    await self._pipeline.runners[index].replay()
            return total

    async def _adopt(self, path: Path) -> RecoveryStats:
        """A segment of this run whose worker died: submit the exchanges that never arrived."""
        from llmtally.pipeline.link import exchange_from_wire

        key = str(path)
        frames = await asyncio.to_thread(read_segment, path)
        self.tracker.opened(key)
        already = self.tracker.received_count(key)
        late = frames[already:]
        for wire in late:
            exchange = exchange_from_wire(wire)
            self.tracker.received(key, exchange.request_id)
            self._submit(exchange)
        self.tracker.sealed(key, already + len(late))
        return RecoveryStats(segments=1, exchanges=len(frames), replayed=len(late))

    def _recover(self, path: Path, spilled_to: set[int]) -> RecoveryStats:
        """A segment a killed run left: each sink that lacks a record gets it in its spill file."""
        from llmtally.pipeline.link import exchange_from_wire

        frames = read_segment(path)
        marks = read_marks(Path(f"{path}{MARKS_SUFFIX}"))
        runners = self._pipeline.runners
        spill_dir = self._pipeline.spill_dir
        overflow = _spilled_ids([spill_dir / "overflow.jsonl", spill_dir / "overflow.jsonl.replay"])
        has: list[set[str]] = []
        for runner in runners:
            ids = set(marks.get(runner.sink.name, ())) | overflow
            ids |= _spilled_ids([runner.spill.path, runner.spill.replay])
            readable = self._readable.get(runner.sink.name)
            if readable is not None:
                # At most one batch is written and not marked (MarkingSink): look a little further.
                ids |= tail_request_ids(readable, 2 * self._pipeline.config.batch_size)
            has.append(ids)
        replayed = skipped = 0
        wanted: list[list[dict[str, Any]]] = [[] for _ in runners]
        for wire in frames:
            request_id = wire[0]
            lacking = [i for i, ids in enumerate(has) if request_id not in ids]
            skipped += len(runners) - len(lacking)
            if not lacking:
                continue
            record = self._build(exchange_from_wire(wire))
            for index in lacking:
                wanted[index].append(record)
                has[index].add(request_id)  # a frame journaled twice is still one record
        for index, records in enumerate(wanted):
            if records:
                runners[index].spill.append(records)  # fsynced: safe before the segment goes
                spilled_to.add(index)
                replayed += len(records)
        _remove(path)
        return RecoveryStats(segments=1, exchanges=len(frames), replayed=replayed, skipped=skipped)


def _add(a: RecoveryStats, b: RecoveryStats) -> RecoveryStats:
    return RecoveryStats(
        a.segments + b.segments, a.exchanges + b.exchanges, a.replayed + b.replayed, a.skipped + b.skipped
    )
