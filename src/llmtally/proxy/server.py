"""Running the proxy: listen, and on SIGTERM stop accepting, drain, flush every record, exit 0.

:func:`run` (``llmtally serve``) starts proxy worker processes under :mod:`llmtally.supervisor`;
:func:`serve` is the single-process form (``[server] workers = 0``, and for embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from aiohttp import web

from llmtally.config import Config, ServerConfig, configure_logging
from llmtally.metering import LocalMeter
from llmtally.pipeline.build import build_pipeline
from llmtally.pricing.reload import PriceReloader, start_auto_update
from llmtally.proxy.app import admin_app_of, create_app
from llmtally.proxy.fastpath import proxy_runner

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


def reload_on_sighup(reloader: PriceReloader) -> None:
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.trigger)
    reloader.start()


async def announce(ready: Callable[[int], Awaitable[None] | None] | None, port: int) -> None:
    """Tell the caller the bound port (``ready`` may be sync or async)."""
    if ready is not None:
        result = ready(port)
        if result is not None:
            await result


async def serve(
    config: Config,
    ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
) -> None:
    """Serve in this one process until SIGTERM/SIGINT (or ``stop`` is set); ``ready`` gets the bound port.

    SIGHUP (or a change of the config or prices file) reloads prices.
    """
    pipeline = build_pipeline(config)
    meter = LocalMeter(config, pipeline)
    pipeline.start()
    app = create_app(config, meter)
    reloader = PriceReloader(config, config_path, meter.use_prices, meter.prices)
    if config.pricing.auto_update:
        start_auto_update(config.pricing.auto_update_interval_h)
    runner = proxy_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await site.start()
    port = _bound_port(runner) or config.server.port
    log.info("llmtally listening on http://%s:%d", config.server.host, port)
    admin_runner = None
    if config.server.admin_port:
        admin_runner = web.AppRunner(admin_app_of(app), access_log=None, handle_signals=False)
        await admin_runner.setup()
        await start_admin_listener(admin_runner, config.server)
    if config.counters.gemini.preload:
        await preload_gemini(meter)
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    reload_on_sighup(reloader)
    await announce(ready, port)
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %.0f s)", config.server.shutdown_grace_s)
    # cleanup(): stop listening → on_shutdown (readyz 503) → wait for handlers → on_cleanup.
    await reloader.stop()
    await runner.cleanup()  # readyz answers 503 on the admin listener meanwhile
    await pipeline.close()
    if admin_runner is not None:
        await admin_runner.cleanup()
    stats = pipeline.stats
    log.info("stopped; records delivered %s, dropped %d", dict(stats.delivered), stats.dropped)


def _bound_port(runner: web.AppRunner) -> int | None:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None


def run(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    config_path: str | None = None,
    workers: int | None = None,
) -> int:
    """Blocking entry point for ``llmtally serve``; the exit status."""
    from llmtally.supervisor import StartupError, supervise

    server = replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
        workers=workers if workers is not None else config.server.workers,
    )
    config = replace(config, server=server)
    configure_logging(config.logging.level)
    main = supervise if server.workers else serve
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on some platforms
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(main(config, config_path=config_path))
    except (StartupError, OSError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
