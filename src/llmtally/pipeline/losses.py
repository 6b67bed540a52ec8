"""Where records go that no sink can take: the quarantine file, and the count of those lost outright.

A record is **quarantined** when it can never be delivered as it is: it cannot be rendered as JSON, or
a sink that takes its neighbours keeps refusing it alone. It is written with a rendering that cannot
fail to ``<spill_dir>/quarantine.jsonl`` (one line per record, with the sink and the reason), logged
once at ERROR with its request id and counted (``llmtally_records_quarantined_total{sink,reason}``).

A record is **lost** when even that is impossible: its spill or quarantine write failed (disk full, an
unusable spill dir), or it was still unsaved when the shutdown budget ran out. Losses are counted
(``llmtally_records_lost_total{sink,reason}``) and logged at most once a minute per sink and reason.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmtally.pipeline.sinks import fallback_render
from llmtally.pipeline.threads import SerialThread

log = logging.getLogger("llmtally.pipeline")

#: At most one log line per minute for each kind of repeated failure.
LOG_INTERVAL_S = 60.0


class Throttle:
    """At most one log line per key per interval; the next line says how many it folded in."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval = interval_s
        self._last: dict[tuple[str, ...], float] = {}
        self._folded: Counter[tuple[str, ...]] = Counter()
        self._lock = threading.Lock()

    def log(self, key: tuple[str, ...], level: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._folded[key] += 1
                return
            self._last[key] = now
            folded = self._folded.pop(key, 0)
        if folded:
            message += " (%d similar messages folded in since the last one)"
            args = (*args, folded)
        log.log(level, message, *args, stacklevel=2)


class Losses:
    """Counts records lost, per sink and reason, and logs them throttled."""

    def __init__(self, lost: Counter[tuple[str, str]]) -> None:
        self.lost = lost
        self._throttle = Throttle()
        self._lock = threading.Lock()

    def count(self, sink: str, reason: str, records: int, error: BaseException | str | None = None) -> None:
        if records <= 0:
            return
        with self._lock:
            self.lost[(sink, reason)] += records
            total = self.lost[(sink, reason)]
        self._throttle.log(
            ("lost", sink, reason), logging.ERROR,
            "%d record(s) LOST for sink %s (%s%s); %d lost for this reason so far",
            records, sink, reason, f": {_describe(error)}" if error is not None else "", total,
        )  # fmt: skip


class Quarantine:
    """``<spill_dir>/quarantine.jsonl``: records kept aside for a person to look at, never retried."""

    def __init__(self, spill_dir: Path, quarantined: Counter[tuple[str, str]], losses: Losses) -> None:
        self.path = spill_dir / "quarantine.jsonl"
        self.quarantined = quarantined
        self._losses = losses
        self._lock = threading.Lock()
        self._thread = SerialThread("quarantine")
        #: Called (from the writing thread) with the sink and the records once they are on disk.
        self.listeners: list[Callable[[str, list[dict[str, Any]]], object]] = []

    async def put(
        self, records: list[dict[str, Any]], sink: str, reason: str, error: BaseException | str | None = None
    ) -> None:
        if records:
            await self._thread.run(self.put_now, records, sink, reason, error)

    def put_now(
        self, records: list[dict[str, Any]], sink: str, reason: str, error: BaseException | str | None = None
    ) -> None:
        """Write, log and count ``records`` (blocking: from a thread)."""
        if not records:
            return
        at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        detail = _describe(error) if error is not None else None
        about = {"quarantined_at": at, "sink": sink, "reason": reason, "error": detail}
        lines = b"".join(fallback_render({**about, "record": r}) + b"\n" for r in records)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as fh:
                    fh.write(lines)
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            self._losses.count(sink, f"{reason}, quarantine failed", len(records), exc)
            return
        with self._lock:
            self.quarantined[(sink, reason)] += len(records)
        for listener in self.listeners:
            try:
                listener(sink, records)
            except Exception:  # pragma: no cover - a listener must not undo the quarantine
                log.exception("quarantine listener failed")
        for record in records:
            log.error(
                "record %s quarantined to %s (sink %s, %s%s)",
                _printable_id(record), self.path, sink, reason, f": {detail}" if detail else "",
            )  # fmt: skip


def _describe(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return error


def _printable_id(record: dict[str, Any]) -> str:
    # The id may itself be what made the record unrenderable: escape it for the log line.
    return str(record.get("request_id")).encode("ascii", "backslashreplace").decode("ascii")
