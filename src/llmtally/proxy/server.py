"""The proxy in one process: listen, and on SIGTERM stop accepting, drain, flush every record.

:func:`serve` is the single-process form of ``llmtally serve`` (``[server] workers = 0``, and for
embedding); :mod:`llmtally.supervisor` runs the multi-process form, :mod:`llmtally.serving` picks one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from llmtally.config import Config
from llmtally.metering import LocalMeter
from llmtally.pipeline.build import build_pipeline
from llmtally.pricing.reload import PriceReloader, start_auto_update
from llmtally.proxy.app import admin_app_of, create_app
from llmtally.proxy.fastpath import proxy_runner
from llmtally.proxy.lifecycle import (
    announce,
    preload_gemini,
    reload_on_sighup,
    start_admin_listener,
    stop_on_signals,
)
from llmtally.proxy.tls import server_tls_context

if TYPE_CHECKING:
    from llmtally.budgets import LocalGate

log = logging.getLogger("llmtally.server")


async def serve(
    config: Config,
    ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
) -> None:
    """Serve in this one process until SIGTERM/SIGINT (or ``stop`` is set); ``ready`` gets the bound port.

    SIGHUP (or a change of the config or prices file) reloads prices.
    """
    tls = server_tls_context(config.server)  # refused before anything starts
    pipeline = build_pipeline(config)
    meter = LocalMeter(config, pipeline)
    pipeline.start()
    app = create_app(config, meter, local_gate(meter), lambda: meter.prices)
    reloader = PriceReloader(config, config_path, meter.use_prices, meter.prices, meter.use_config)
    if config.pricing.auto_update:
        start_auto_update(config.pricing.auto_update_interval_h)
    runner = proxy_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await site.start()
    port = _bound_port(runner) or config.server.port
    meter.start(port)
    log.info("llmtally listening on http://%s:%d", config.server.host, port)
    if tls is not None:
        tls_site = web.TCPSite(
            runner, config.server.host, config.server.tls_port, ssl_context=tls, reuse_address=True
        )
        await tls_site.start()
        log.info("llmtally listening on https://%s:%d (TLS)", config.server.host, site_port(tls_site))
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
    await meter.close()
    if admin_runner is not None:
        await admin_runner.cleanup()
    stats = pipeline.stats
    log.info("stopped; records delivered %s, dropped %d", dict(stats.delivered), stats.dropped)


def local_gate(meter: LocalMeter) -> LocalGate | None:
    """The budget gate of a proxy whose meter runs in its own process."""
    from llmtally.budgets import LocalGate

    return LocalGate(meter.budgets) if meter.budgets is not None else None


def site_port(site: web.TCPSite) -> int:
    """The port ``site`` listens on (its configured one resolved when that was 0)."""
    server = site._server  # aiohttp keeps the asyncio server private; the port is in its sockets
    sockets = getattr(server, "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    return site._port


def _bound_port(runner: web.AppRunner) -> int | None:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return None
