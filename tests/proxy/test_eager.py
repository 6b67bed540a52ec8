"""Starting a coroutine inside the callback that has its input."""

from __future__ import annotations

import asyncio

import pytest

from llmtally.proxy.eager import start_eagerly


async def test_start_eagerly_runs_up_to_the_first_wait_at_once_and_the_rest_as_a_task() -> None:
    loop = asyncio.get_running_loop()
    upstream_answer: asyncio.Future[str] = loop.create_future()
    steps: list[str] = []

    async def call() -> None:
        steps.append("sent upstream")
        steps.append(await upstream_answer)

    task = start_eagerly(loop, call())
    assert steps == ["sent upstream"]  # before the loop ran anything else
    assert task is not None and not task.done()
    upstream_answer.set_result("answered")
    await task
    assert steps == ["sent upstream", "answered"]


async def test_start_eagerly_returns_none_for_a_call_answered_at_once() -> None:
    steps: list[str] = []

    async def bad_path() -> None:
        steps.append("answered 400")

    assert start_eagerly(asyncio.get_running_loop(), bad_path()) is None
    assert steps == ["answered 400"]


async def test_start_eagerly_passes_cancellation_and_failures_into_the_call() -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    async def waits(future: asyncio.Future[None]) -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        except ConnectionResetError as exc:
            seen.append(f"failed: {exc}")

    left: asyncio.Future[None] = loop.create_future()
    task = start_eagerly(loop, waits(left))
    assert task is not None
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    broken: asyncio.Future[None] = loop.create_future()
    task = start_eagerly(loop, waits(broken))
    assert task is not None
    broken.set_exception(ConnectionResetError("upstream reset"))
    await task
    assert seen == ["cancelled", "failed: upstream reset"]
