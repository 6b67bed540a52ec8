"""One daemon thread per sink (and per spill file) for blocking writes.

``asyncio.to_thread`` runs on the loop's shared executor: a write that never returns (a full pipe, a
hung NFS mount, a FIFO nobody reads) keeps one of its few threads forever, a handful of them starve
every other sink and the record builder, and the interpreter then waits for those threads at exit, so
SIGTERM hangs. A ``SerialThread`` keeps a hung write to its owner: later calls queue behind it (and time
out in the runner), nothing else waits, and being a daemon it never holds up the exit. Calls run in
order, which file appends need anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class SerialThread:
    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this thread; cancelling the wait leaves the call running (nothing can stop it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._ensure_thread()
        self._calls.put((loop, future, fn, args))
        return await future

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"llmtally-{self.name}", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._calls.get()
            if future.cancelled():
                continue  # nobody waits for it any more (the runner gave up or stopped)
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the waiter, whatever it is
                _settle(loop, future, None, exc)
            else:
                _settle(loop, future, result, None)


def _settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    def settle() -> None:
        if future.done():
            return  # cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting, nobody waits
        loop.call_soon_threadsafe(settle)
