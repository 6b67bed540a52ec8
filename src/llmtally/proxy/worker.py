"""One proxy worker process: the transport only, its records built by the main process.

``llmtally serve`` starts ``[server] workers`` of these (see :mod:`llmtally.supervisor`). Each binds the
proxy port with SO_REUSEPORT, so the kernel spreads connections across them, and sends every metered
call's exchange over a :class:`~llmtally.pipeline.link.LinkClient`. A worker stops on SIGTERM/SIGINT
(draining in-flight calls for up to ``shutdown_grace_s``) or when the main process goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from llmtally.config import Config, configure_logging
from llmtally.pipeline.journal import JournalWriter
from llmtally.pipeline.link import LinkClient
from llmtally.proxy.app import create_app
from llmtally.proxy.fastpath import proxy_runner
from llmtally.proxy.tls import server_tls_context

log = logging.getLogger("llmtally.worker")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: Config
    index: int
    #: The proxy port, already resolved (the main process holds it reserved).
    port: int
    link_path: str
    admin_path: str
    #: Where this worker journals its exchanges (None: no journal), and the run they belong to.
    journal_dir: str | None = None
    run: str = ""
    #: The main process's budget gate (None: no [budgets] rules).
    gate_path: str | None = None
    #: The config file (its prices are reloaded here too when this worker prices cost headers).
    config_path: str | None = None
    #: The TLS port, already resolved (None: no ``[server] tls_cert_file``).
    tls_port: int | None = None


def main() -> None:
    """A worker process's entry point: its :class:`WorkerSpec` comes pickled on stdin (from the
    supervisor, its parent: trusted input)."""
    worker_main(pickle.load(sys.stdin.buffer))


def worker_main(spec: WorkerSpec) -> None:
    """Run one proxy worker until SIGTERM/SIGINT or until the main process goes away."""
    configure_logging(spec.config.logging.level)
    # Records are priced in the main process, which reloads on SIGHUP and passes it on; a worker
    # pricing cost headers reloads its own book then (serve_worker), others ignore it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on some platforms
        asyncio.run(serve_worker(spec))
    else:
        uvloop.run(serve_worker(spec))


async def serve_worker(spec: WorkerSpec) -> None:
    config = spec.config
    journal = None
    if spec.journal_dir is not None:
        pipeline = config.pipeline
        journal = JournalWriter(
            Path(spec.journal_dir),
            spec.run,
            pipeline.journal_segment_mb * 1024 * 1024,
            pipeline.journal_fsync,
        )
    link = await LinkClient.connect(spec.link_path, spec.admin_path, journal)
    gate = None
    if spec.gate_path is not None:
        from llmtally.budgets import DirectGate, RemoteGate

        # Redis: this worker reserves itself (one round trip per call); memory: the main process
        # holds the pod's counters and answers.
        kind = RemoteGate if config.budgets.store == "memory" else DirectGate
        gate = await kind.connect(spec.gate_path, config.budgets)
    prices, reloader = None, None
    if config.server.cost_header:
        from llmtally.pricing import PriceBook
        from llmtally.pricing.reload import PriceReloader

        book = PriceBook(config.pricing)
        held = [book]
        reloader = PriceReloader(config, spec.config_path, lambda new: held.__setitem__(0, new), book)

        def prices() -> PriceBook:
            return held[0]

    app = create_app(config, link, gate, prices)
    runner = proxy_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, spec.port, reuse_address=True, reuse_port=True)
    await site.start()
    tls = server_tls_context(config.server)
    if tls is not None and spec.tls_port is not None:
        tls_site = web.TCPSite(
            runner, config.server.host, spec.tls_port, ssl_context=tls, reuse_address=True, reuse_port=True
        )
        await tls_site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    lost = loop.create_task(link.closed.wait())
    lost.add_done_callback(lambda _: stop.set())
    if reloader is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
        reloader.start()
    link.send_ready(spec.port)
    await stop.wait()
    if reloader is not None:
        await reloader.stop()
    if link.closed.is_set():
        log.error("worker %d: the record process is gone; stopping", spec.index)
    await runner.cleanup()  # stop listening, let in-flight calls finish, then on_cleanup
    await link.close()
    if gate is not None:
        gate.close()
    lost.cancel()
