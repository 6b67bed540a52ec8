"""Start a coroutine at once, inside the callback that has its input, instead of on the loop's next turn."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to its first wait, and from there on as a task (None: it finished now).

    A metered call's request then reaches the upstream inside the read callback that completed it,
    ahead of the work other calls queued on the loop (their stream events, under load): a task's
    first step would run after all of it. This is Python 3.12's ``eager_start``, done for 3.11.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_Resumed(coro, waiting_on))


class _Resumed(Coroutine[Any, Any, None]):
    """``coro``, suspended on ``waiting_on``, as a coroutine a task can run from there.

    A class, not a generator: a task cancelled before its first step throws into its coroutine at
    once, and that must reach ``coro`` (which then records the call) rather than stop a generator
    that never started.
    """

    __slots__ = ("coro", "waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self.coro = coro
        self.waiting_on = waiting_on

    def send(self, value: Any) -> Any:
        # The task's first step reports the future coro already waits on. (A bare ``yield``, None,
        # asks for one more step anyway: coro goes on now, inside the task.)
        if self.waiting_on is not None:
            waiting_on, self.waiting_on = self.waiting_on, None
            return waiting_on
        return self.coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self.waiting_on = None
        return self.coro.throw(*exc)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        return self.coro.__await__()
