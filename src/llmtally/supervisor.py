"""``llmtally serve``: proxy worker processes, and this one building and delivering every record.

The main process holds the proxy port (bound with SO_REUSEPORT, not listening), starts ``[server]
workers`` proxy processes that listen on it, and runs the one record pipeline they all feed through a
Unix socket. So records are counted and priced off the proxy's event loop (and off its GIL), there
is one stdout writer (whole JSON lines whatever the worker count), one spill directory and one set of
Prometheus metrics, served on the admin listener and, through the workers, on the proxy port.

SIGTERM/SIGINT: readiness turns 503, workers stop accepting and drain for up to ``shutdown_grace_s``,
then every record they sent is delivered and the process exits 0. A worker that dies is restarted.

SIGKILL: workers journal every exchange (:mod:`llmtally.pipeline.journal`); the next start replays
what was not delivered, before new traffic, at most once per sink (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from llmtally.budgets import GateServer
from llmtally.config import Config
from llmtally.exchange import Exchange
from llmtally.metering import LocalMeter
from llmtally.pipeline.build import build_pipeline
from llmtally.pipeline.journal import JournalInUse, RecordJournal, new_run_id
from llmtally.pipeline.link import LinkServer, WorkerReady
from llmtally.pipeline.queue import RecordPipeline
from llmtally.pricing.reload import PriceReloader, start_auto_update
from llmtally.proxy.app import create_admin_app
from llmtally.proxy.lifecycle import (
    announce,
    preload_gemini,
    reload_on_sighup,
    start_admin_listener,
    stop_on_signals,
)
from llmtally.proxy.tls import TlsConfigError, server_tls_context
from llmtally.proxy.worker import WorkerSpec

log = logging.getLogger("llmtally.server")

#: A worker must be listening this soon after it starts.
WORKER_START_TIMEOUT_S = 60.0
#: The GIL switch interval of the record process when it answers budget checks (docs/performance.md).
GATE_SWITCH_INTERVAL_S = 0.0002
#: Wait this long before restarting a worker that died, so a crash loop does not spin.
RESTART_DELAY_S = 1.0


class StartupError(RuntimeError):
    """The proxy workers could not start; the message says why."""


@dataclass
class Workers:
    """The proxy worker processes and what the main process knows of them.

    Each is a plain ``python -c`` child, its :class:`WorkerSpec` pickled on its stdin: multiprocessing's
    "spawn" would add a resource-tracker process (12 MB) and re-import the parent's ``__main__``.
    """

    config: Config
    port: int
    link_path: str
    admin_path: str
    journal_dir: str | None = None
    run: str = ""
    #: The budget gate's socket (None: no [budgets] rules).
    gate_path: str | None = None
    #: The config file, which workers pricing cost headers watch for price changes.
    config_path: str | None = None
    #: The TLS port, resolved (None: no TLS listener).
    tls_port: int | None = None
    processes: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    exited: dict[int, asyncio.Event] = field(default_factory=dict)
    ready: dict[int, WorkerReady] = field(default_factory=dict)
    stopping: bool = False
    #: All workers were up once: from then on a dead worker is restarted, before it ends the start.
    started: bool = False
    #: Set when a worker died before the first start completed (why is in the log).
    start_failed: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    _watches: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, index: int) -> None:
        spec = WorkerSpec(
            self.config,
            index,
            self.port,
            self.link_path,
            self.admin_path,
            self.journal_dir,
            self.run,
            self.gate_path,
            tls_port=self.tls_port,
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from llmtally.proxy.worker import main; main()",
            stdin=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(spec))
        process.stdin.close()
        self.processes[index] = process
        self.exited[index] = asyncio.Event()
        watch = asyncio.get_running_loop().create_task(self._watch(index, process))
        self._watches.add(watch)
        watch.add_done_callback(self._watches.discard)

    def hang_up(self) -> None:
        """Pass a SIGHUP on: each worker reloads the prices its cost headers are priced with."""
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)

    def on_ready(self, message: WorkerReady) -> None:
        for index, process in self.processes.items():
            if process.pid == message.pid:
                self.ready[index] = message

    @property
    def all_ready(self) -> bool:
        return len(self.ready) == self.config.server.workers and not self.stopping

    def not_ready(self) -> str | None:
        """Readiness for the admin listener: None when every worker is listening."""
        if self.stopping:
            return "draining"
        if not self.all_ready:
            return f"starting: {len(self.ready)}/{self.config.server.workers} workers"
        return None

    async def _watch(self, index: int, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        self.ready.pop(index, None)
        self.exited[index].set()
        if self.stopping:
            return
        if not self.started:
            log.error("proxy worker %d exited with %s while starting", index, code)
            self.start_failed.set()
            return
        log.error(
            "proxy worker %d (pid %s) exited with %s; restarting it in %.0f s",
            index, process.pid, code, RESTART_DELAY_S,
        )  # fmt: skip
        self.restarts += 1
        await asyncio.sleep(RESTART_DELAY_S)
        if not self.stopping:
            await self.start(index)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker; SIGKILL what is still running after the grace period."""
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                process.terminate()
        deadline = time.monotonic() + grace_s + 5
        for index, process in self.processes.items():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited[index].wait(), max(0.0, deadline - time.monotonic()))
            if process.returncode is None:
                log.error("proxy worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                await process.wait()
        for watch in list(self._watches):
            watch.cancel()


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) the proxy port with SO_REUSEPORT: it resolves port 0 and keeps the port ours
    while workers come and go; only listening sockets take connections."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, int(sock.getsockname()[1])


async def supervise(
    config: Config,
    ready: Callable[[int], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
) -> None:
    """Serve with ``config.server.workers`` proxy processes until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)  # from the start: a stop while starting is orderly too
    pipeline = build_pipeline(config)
    meter = LocalMeter(config, pipeline)
    try:
        tls = server_tls_context(config.server)  # refused here, not by each worker at its start
    except TlsConfigError as exc:
        raise StartupError(str(exc)) from None
    placeholder, port = _reserve_port(config.server.host, config.server.port)
    tls_placeholder, tls_port = None, None
    if tls is not None:
        try:
            tls_placeholder, tls_port = _reserve_port(config.server.host, config.server.tls_port)
        except OSError:
            placeholder.close()
            raise
    link: LinkServer | None = None
    journal = None
    if config.pipeline.journal:
        journal = _journal(config, port, pipeline, meter, lambda: link.live_pids() if link else set())
        try:
            journal.acquire()
            await journal.scan(replay_now=False)  # the runners deliver it first, before new traffic
        except JournalInUse as exc:
            placeholder.close()
            if tls_placeholder is not None:
                tls_placeholder.close()
            raise StartupError(str(exc)) from None
        except OSError as exc:  # e.g. an unusable spill dir: traffic and records still flow, unjournaled
            log.error(
                "journal off: %s: %s (a SIGKILL now loses the records still on their way)",
                type(exc).__name__, exc,
            )  # fmt: skip
            journal = None
    pipeline.start()
    meter.start(port)
    reloader = PriceReloader(config, config_path, meter.use_prices, meter.prices, meter.use_config)
    if config.pricing.auto_update:
        start_auto_update(config.pricing.auto_update_interval_h)
    runtime = Path(tempfile.mkdtemp(prefix="llmtally-"))  # 0700: only this user reaches the sockets
    workers = Workers(
        config,
        port,
        str(runtime / "link.sock"),
        str(runtime / "admin.sock"),
        str(journal.directory) if journal else None,
        journal.run if journal else "",
        str(runtime / "gate.sock") if meter.budgets is not None else None,
        config_path,
        tls_port=tls_port,
    )
    gate = GateServer(meter.budgets) if meter.budgets is not None else None
    if gate is not None and config.budgets.store == "memory":
        # This loop answers the workers' checks while the record thread builds records: at the
        # default 5 ms GIL switch interval a check could wait that long behind a batch of records.
        sys.setswitchinterval(GATE_SWITCH_INTERVAL_S)
    all_ready = asyncio.Event()

    def on_ready(message: WorkerReady) -> None:
        workers.on_ready(message)
        if workers.all_ready:
            all_ready.set()

    link = LinkServer(workers.link_path, meter.submit, on_ready, journal.tracker if journal else None)
    if journal is not None:
        journal.start()
    admin_runner = web.AppRunner(
        create_admin_app(meter, workers.not_ready), access_log=None, handle_signals=False
    )
    await admin_runner.setup()
    try:
        await link.start()
        if gate is not None:
            assert workers.gate_path is not None
            await gate.start(workers.gate_path)
        await web.UnixSite(admin_runner, workers.admin_path).start()
        await start_admin_listener(admin_runner, config.server)
        if config.counters.gemini.preload:
            await preload_gemini(meter)
        for index in range(config.server.workers):
            await workers.start(index)
        await _first_of((all_ready, workers.start_failed, stop), WORKER_START_TIMEOUT_S)
        if stop.is_set():
            log.info("stopped while starting")
            return
        if not all_ready.is_set():
            raise StartupError(
                f"{len(workers.ready)} of {config.server.workers} proxy workers started "
                "(see their errors above)"
            )
        workers.started = True
        log.info(
            "llmtally listening on http://%s:%d (%d proxy worker%s)",
            config.server.host, port, config.server.workers, "" if config.server.workers == 1 else "s",
        )  # fmt: skip
        if tls_port is not None:
            log.info("llmtally listening on https://%s:%d (TLS)", config.server.host, tls_port)
        reload_on_sighup(reloader, workers.hang_up)
        await announce(ready, port)
        await stop.wait()
        log.info("shutting down: draining in-flight requests (up to %.0f s)", config.server.shutdown_grace_s)
    finally:
        await workers.stop(config.server.shutdown_grace_s)  # readyz answers 503 meanwhile
        if not await link.wait_idle(10):
            log.error("a proxy worker's link stayed open after it stopped")
        await link.close()
        if gate is not None:
            await gate.close()
        await reloader.stop()
        if journal is not None:
            await journal.stop()  # what workers that died journaled and never sent
        await pipeline.close()
        await meter.close()  # after the last record: its settlement is queued, then applied or saved
        if journal is not None:
            journal.close()
        await admin_runner.cleanup()
        placeholder.close()
        if tls_placeholder is not None:
            tls_placeholder.close()
        shutil.rmtree(runtime, ignore_errors=True)
    stats = pipeline.stats
    log.info(
        "stopped; records received %d, delivered %s, dropped %d, worker restarts %d",
        link.received, dict(stats.delivered), stats.dropped, workers.restarts,
    )  # fmt: skip


async def _first_of(events: tuple[asyncio.Event, ...], within_s: float) -> None:
    """Wait until any of ``events`` is set, or ``within_s`` passes."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _journal(
    config: Config,
    port: int,
    pipeline: RecordPipeline,
    meter: LocalMeter,
    live_pids: Callable[[], set[int]],
) -> RecordJournal:
    """The record side of the journal: per port by default, so two meters on one machine (or the
    test suite's many) never replay each other's calls."""
    pipeline_config = config.pipeline
    directory = Path(pipeline_config.journal_dir or pipeline.spill_dir / f"journal-{port}")

    def build(exchange: Exchange) -> dict[str, Any]:
        return meter.build(exchange).to_dict()  # settled with the budgets too (idempotent)

    # The sinks whose file can be read back (names as the sinks give them, see pipeline/sinks.py).
    readable: dict[str, Path] = {}
    if config.logging.destination not in ("stdout", "-"):
        readable[f"jsonl:{config.logging.destination}"] = Path(config.logging.destination)
    if config.sinks.file.path:
        readable[f"file:{config.sinks.file.path}"] = Path(config.sinks.file.path)
    return RecordJournal(
        directory,
        new_run_id(),
        pipeline,
        build,
        meter.submit,
        readable,
        pipeline_config.journal_fsync,
        live_pids,
    )
