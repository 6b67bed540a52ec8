"""A record pipeline on its own event-loop thread, for library callers (sync or async).

``submit`` hands a record over without waiting; ``flush`` waits until every sink has it. The thread is a
daemon and is flushed at interpreter exit, so records submitted before exit are delivered.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from llmtally.config import PipelineConfig
from llmtally.pipeline.queue import RecordPipeline
from llmtally.pipeline.sinks import Sink
from llmtally.record import UsageRecord

log = logging.getLogger("llmtally.pipeline")


class BackgroundPipeline:
    def __init__(self, sinks: Sequence[Sink], config: PipelineConfig | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self.pipeline = RecordPipeline(sinks, config)
        self._thread = threading.Thread(target=self._run, name="llmtally-delivery", daemon=True)
        self._ready = threading.Event()
        self._closed = False
        self._thread.start()
        self._ready.wait()
        atexit.register(self.close)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started)
        self._loop.run_forever()

    def _started(self) -> None:
        self.pipeline.start()
        self._ready.set()

    def add_sink(self, sink: Sink) -> None:
        """Add a sink while running (library hooks)."""
        self._call(self._add, sink).result()

    async def _add(self, sink: Sink) -> None:
        self.pipeline.add_sink(sink)

    def submit(self, record: UsageRecord) -> None:
        if self._closed:
            raise RuntimeError("the tracker's delivery is closed")
        self._loop.call_soon_threadsafe(self.pipeline.submit, record)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything submitted so far reached every sink."""
        self._call(self.pipeline.flush).result(timeout)

    async def aflush(self) -> None:
        await asyncio.wrap_future(self._call(self.pipeline.flush))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self.pipeline.close).result(60)
        except Exception:
            log.exception("closing the tracker's delivery failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
