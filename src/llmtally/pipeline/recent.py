"""The records of the last few minutes by request id: ``GET /calls/{id}`` on the admin port.

A streamed response cannot carry its cost in its head (it is not known until the stream ends), so a
caller reads it here afterwards, by the ``x-llmtally-request-id`` every metered response carries.
Bounded by age (``[server] calls_window_s``) and count (``calls_max``); fed from the thread that
builds records, read from the loop, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtally.record import UsageRecord


class RecentCalls:
    def __init__(self, window_s: float, max_calls: int) -> None:
        self.window_s = window_s
        self.max_calls = max_calls
        #: The records themselves: turned into a dict only when one is asked for (the pipeline
        #: makes its own dict of every record; a second one each would be work for nothing).
        self._calls: OrderedDict[str, tuple[float, UsageRecord]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, record: UsageRecord) -> None:
        if self.max_calls <= 0 or self.window_s <= 0:
            return
        now = time.monotonic()
        with self._lock:
            calls = self._calls
            calls[record.request_id] = (now, record)
            calls.move_to_end(record.request_id)
            while len(calls) > self.max_calls:
                calls.popitem(last=False)
            self._expire(now)

    def get(self, request_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            found = self._calls.get(request_id)
        return found[1].to_dict() if found is not None else None

    def _expire(self, now: float) -> None:
        calls = self._calls
        while calls:
            first = next(iter(calls.values()))
            if now - first[0] <= self.window_s:
                break
            calls.popitem(last=False)

    def __len__(self) -> int:
        return len(self._calls)
