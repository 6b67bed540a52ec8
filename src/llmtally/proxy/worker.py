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


def main() -> None:
    """A worker process's entry point: its :class:`WorkerSpec` comes pickled on stdin (from the
    supervisor, its parent: trusted input)."""
    worker_main(pickle.load(sys.stdin.buffer))


def worker_main(spec: WorkerSpec) -> None:
    """Run one proxy worker until SIGTERM/SIGINT or until the main process goes away."""
    configure_logging(spec.config.logging.level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # prices live in the main process; it reloads them
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
        from llmtally.budgets import RemoteGate

        gate = await RemoteGate.connect(spec.gate_path, config.budgets)
    app = create_app(config, link, gate)
    runner = proxy_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, spec.port, reuse_address=True, reuse_port=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    lost = loop.create_task(link.closed.wait())
    lost.add_done_callback(lambda _: stop.set())
    link.send_ready(spec.port)
    await stop.wait()
    if link.closed.is_set():
        log.error("worker %d: the record process is gone; stopping", spec.index)
    await runner.cleanup()  # stop listening, let in-flight calls finish, then on_cleanup
    await link.close()
    if gate is not None:
        gate.close()
    lost.cancel()
