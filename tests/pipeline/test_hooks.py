"""Library delivery: on_usage hooks (sync and async), background delivery, sync=True."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from llmtally import CallParams, TokenTracker
from llmtally.pipeline import MemorySink

BODY = {
    "model": "gpt-4o",
    "object": "chat.completion",
    "usage": {"prompt_tokens": 10, "completion_tokens": 5},
}


def test_hooks_run_off_the_callers_path_and_never_break_it() -> None:
    memory = MemorySink()
    tracker = TokenTracker(sinks=[memory])
    seen: list[str] = []
    slow_release = threading.Event()

    def slow(record: dict[str, Any]) -> None:
        slow_release.wait(5)

    def failing(record: dict[str, Any]) -> None:
        raise RuntimeError("hook bug")

    async def async_hook(record: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(record["request_id"])

    tracker.on_usage(slow)
    tracker.on_usage(failing)
    tracker.on_usage(async_hook)
    start = time.perf_counter()
    ids = [tracker.track_usage(CallParams(model="gpt-4o"), BODY).record.request_id for _ in range(20)]
    assert time.perf_counter() - start < 2  # a blocked hook does not block track_usage
    slow_release.set()
    tracker.flush(timeout=30)
    assert seen == ids
    assert [r["request_id"] for r in memory.records] == ids
    assert memory.records[0]["input_tokens"] == 10
    tracker.close()


def test_sync_true_delivers_before_returning() -> None:
    memory = MemorySink()
    tracker = TokenTracker(sinks=[memory])
    metrics = tracker.track_usage(CallParams(model="gpt-4o"), BODY, sync=True)
    assert [r["request_id"] for r in memory.records] == [metrics.record.request_id]
    tracker.close()


async def test_async_tracking_with_sync_delivery() -> None:
    memory = MemorySink()
    tracker = TokenTracker(sinks=[memory])
    metrics = await tracker.atrack_usage(CallParams(model="gpt-4o"), BODY, sync=True)
    assert memory.records[-1]["request_id"] == metrics.record.request_id
    tracker.close()


def test_no_sinks_means_no_delivery_thread() -> None:
    tracker = TokenTracker()
    tracker.track_usage(CallParams(model="gpt-4o"), BODY)
    assert tracker._delivery is None
