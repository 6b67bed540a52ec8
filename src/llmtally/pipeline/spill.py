"""Spill files: records that could not be delivered yet, kept on local disk as JSON lines.

``append`` adds records (each rendered alone: one that cannot be JSON is handed back, never blocks
the file); ``take`` moves the file aside (atomically) and returns its records for a
replay; ``done`` removes the replayed file once the records are delivered. A crash between ``take``
and ``done`` leaves the replay file in place, so the next ``take`` returns the same records again:
nothing is lost (a receiver that honours idempotency keys sees no duplicates).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from llmtally.pipeline.sinks import render_each

log = logging.getLogger("llmtally.pipeline")


class SpillFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.replay = self.path.with_suffix(self.path.suffix + ".replay")
        self._lock = threading.Lock()

    def append(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the records that render; returns those that do not (for the quarantine).

        Raises ``OSError`` when the file cannot be written (disk full, directory unusable).
        """
        data, unrenderable = render_each(records)
        if not data:
            return unrenderable
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # records are money: on disk before we say they are safe
        return unrenderable

    def has_records(self) -> bool:
        return self.replay.exists() or (self.path.exists() and self.path.stat().st_size > 0)

    def take(self) -> list[dict[str, Any]]:
        """Records to replay (the same ones again until ``done``)."""
        with self._lock:
            if not self.replay.exists():
                if not self.path.exists():
                    return []
                os.replace(self.path, self.replay)
            return read_records(self.replay)

    def done(self) -> None:
        with self._lock:
            self.replay.unlink(missing_ok=True)


def read_records(path: Path) -> list[dict[str, Any]]:
    """JSON lines → record dicts; costs parsed as exact Decimals; a torn last line is skipped."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line, parse_float=Decimal))
            except json.JSONDecodeError:
                log.error("%s:%d: unreadable spilled record skipped", path, number)
    return out
