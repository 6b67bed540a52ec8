"""What both forms of ``llmtally serve`` do around the proxy: signals, the admin listener, the
Gemini tokenizer preload, price reloads on SIGHUP and telling the caller the bound port.

Used by :func:`llmtally.proxy.server.serve` (one process) and :mod:`llmtally.supervisor` (workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from llmtally.config import ServerConfig
from llmtally.metering import LocalMeter
from llmtally.pricing.reload import PriceReloader

log = logging.getLogger("llmtally.server")


async def preload_gemini(meter: LocalMeter) -> None:
    """Load the Gemini tokenizer now (~2 s), so the first Gemini record is not an estimate."""
    load = getattr(meter.counters["gemini"], "load", None)
    if load is not None:
        try:
            await asyncio.to_thread(load)
        except Exception as exc:
            log.error("Gemini tokenizer preload failed: %s", exc)


async def start_admin_listener(runner: web.AppRunner, server: ServerConfig) -> None:
    """The admin listener on ``[server] admin_host:admin_port`` (when the port is set)."""
    if not server.admin_port:
        return
    await web.TCPSite(runner, server.admin_host, server.admin_port, reuse_address=True).start()
    log.info("admin (healthz, readyz, metrics) on http://%s:%d", server.admin_host, server.admin_port)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not available off the main thread or on Windows; then only `stop` ends the server.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def reload_on_sighup(reloader: PriceReloader, also: Callable[[], None] | None = None) -> None:
    """SIGHUP reloads now (and tells ``also``: the workers, which price cost headers themselves)."""

    def hup() -> None:
        reloader.trigger()
        if also is not None:
            also()

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup)
    reloader.start()


async def announce(ready: Callable[[int], Awaitable[None] | None] | None, port: int) -> None:
    """Tell the caller the bound port (``ready`` may be sync or async)."""
    if ready is not None:
        result = ready(port)
        if result is not None:
            await result
