"""The link between proxy worker processes and the record process, over a Unix socket.

Under ``llmtally serve`` the proxy workers only move bytes; each metered call's
:class:`~llmtally.exchange.Exchange` travels to the main process, which counts, prices and delivers
records. Python work in a thread of the proxy process would compete with its event loop for the GIL
(the profile in docs/performance.md showed ~170 µs per ``socket.send`` under load); in another process
it competes only for a core, which the kernel schedules far more finely.

Frames are a 4-byte big-endian length and a pickle. Pickle is safe here: both ends are llmtally
processes of the same user, and the socket lives in a private (0700) directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from llmtally.exchange import Exchange
from llmtally.pipeline.journal import JournalTracker, JournalWriter, SegmentOpened, SegmentSealed
from llmtally.providers.base import Endpoint, MeteredRequest, ResponseSummary
from llmtally.record import TokenUsage

log = logging.getLogger("llmtally.link")

_HEADER = struct.Struct(">I")
#: ``started_at`` travels as microseconds since this: pickling an aware datetime costs ~5 µs a call
#: on the proxy's loop (its timezone goes through copyreg each time), an int next to nothing.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: A frame larger than this is refused (request and response bodies are capped far below it).
MAX_FRAME = 1 << 31
#: Warn when this much is waiting to reach the record process (it is slow or stuck).
BACKLOG_WARNING_BYTES = 64 * 1024 * 1024
#: Exchanges wait this long to travel together: sending each call's at once woke the record process
#: in the middle of the burst of calls that follows it (+0.5 ms p50 at 16 clients, load test).
FLUSH_AFTER_S = 0.005


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """A proxy worker is listening."""

    pid: int
    port: int


def _frame(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def summary_to_wire(summary: ResponseSummary | None) -> tuple[Any, ...] | None:
    """A summary as a flat tuple: pickling the dataclasses (``__getstate__`` in Python, per object)
    took ~5 µs a summary on the proxy's loop, the tuple ~0.6 µs; it matters where summaries come by
    the thousand (a batch download's results) and for every stream parsed in the worker."""
    if summary is None:
        return None
    u = summary.usage
    usage = None
    if u is not None:
        usage = (
            u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens,
            u.cache_write_1h_tokens, u.reasoning_tokens, u.input_audio_tokens, u.output_audio_tokens,
            u.input_image_tokens, u.output_image_tokens,
            u.cache_read_audio_tokens,
        )  # fmt: skip
    return (
        summary.model, usage, summary.output_text, summary.upstream_request_id, summary.service_tier,
        summary.inference_geo, summary.error, summary.usage_error, summary.complete, summary.line_items,
    )  # fmt: skip


def summary_from_wire(t: Any) -> ResponseSummary | None:
    if not isinstance(t, tuple):  # None, or a ResponseSummary pickled whole by an older version
        return t  # type: ignore[no-any-return]
    model, usage, text, upstream_request_id, tier, geo, error, usage_error, complete, items = t
    return ResponseSummary(
        model=model,
        usage=TokenUsage(*usage) if usage is not None else None,
        output_text=text,
        upstream_request_id=upstream_request_id,
        service_tier=tier,
        inference_geo=geo,
        error=error,
        usage_error=usage_error,
        complete=complete,
        line_items=items,
    )


def exchange_to_wire(ex: Exchange) -> tuple[Any, ...]:
    """An exchange as a flat tuple: pickling it is several times cheaper than pickling the dataclasses
    (which goes through Python-level ``__getstate__`` per object), and it runs on the proxy's loop.

    ``input_estimate`` (a local object) and ``deferred`` (a proxy-side flag) do not travel.
    """
    r = ex.request
    e = r.endpoint
    started = ex.started_at if ex.started_at.tzinfo is not None else ex.started_at.replace(tzinfo=UTC)
    return (
        ex.request_id, ex.provider, (started - _EPOCH) // _MICROSECOND,
        e.provider, e.name, e.url_model, e.always_stream,
        r.body, r.model, r.stream, r.payload, r.injected_usage, r.stream_format,
        r.service_tier, r.inference_geo, r.error,
        summary_to_wire(ex.summary), ex.response_body, ex.response_chunks, ex.response_encoding,
        ex.response_stream, ex.status,
        ex.latency_ms, ex.ttfb_ms, ex.client_disconnected, ex.tags, ex.error, ex.upstream_request_id,
        ex.count_input, ex.platform, ex.price_model, ex.pricing_note, ex.usage_headers, ex.budget_exceeded,
        ex.batch_id, ex.custom_id, ex.session_id,
    )  # fmt: skip


#: Fields added to the wire tuple since it was first journaled, with the value an older frame means.
_ADDED_FIELDS: tuple[Any, ...] = ("direct", None, None, None, None, None, None, None)  # platform … session_id
_FIELDS = 37


def exchange_from_wire(t: tuple[Any, ...]) -> Exchange:
    if len(t) < _FIELDS:  # written by an older version (a journal segment left across an upgrade)
        t = t + _ADDED_FIELDS[len(_ADDED_FIELDS) - (_FIELDS - len(t)) :]
    (
        request_id, provider, started_us,
        e_provider, e_name, e_url_model, e_always_stream,
        body, model, stream, payload, injected_usage, stream_format,
        service_tier, inference_geo, request_error,
        summary, response_body, response_chunks, response_encoding, response_stream, status,
        latency_ms, ttfb_ms, client_disconnected, tags, error, upstream_request_id,
        count_input, platform, price_model, pricing_note, usage_headers, budget_exceeded,
        batch_id, custom_id, session_id,
    ) = t  # fmt: skip
    request = MeteredRequest(
        endpoint=Endpoint(e_provider, e_name, e_url_model, e_always_stream),
        body=body,
        model=model,
        stream=stream,
        payload=payload,
        injected_usage=injected_usage,
        stream_format=stream_format,
        service_tier=service_tier,
        inference_geo=inference_geo,
        error=request_error,
    )
    return Exchange(
        request_id=request_id,
        provider=provider,
        request=request,
        started_at=_EPOCH + timedelta(microseconds=started_us),
        summary=summary_from_wire(summary),
        response_body=response_body,
        response_chunks=response_chunks,
        response_encoding=response_encoding,
        response_stream=response_stream,
        status=status,
        latency_ms=latency_ms,
        ttfb_ms=ttfb_ms,
        client_disconnected=client_disconnected,
        tags=tags,
        error=error,
        upstream_request_id=upstream_request_id,
        count_input=count_input,
        platform=platform,
        price_model=price_model,
        pricing_note=pricing_note,
        usage_headers=usage_headers,
        budget_exceeded=budget_exceeded,
        batch_id=batch_id,
        custom_id=custom_id,
        session_id=session_id,
    )


class LinkClient:
    """A proxy worker's end: a :class:`~llmtally.exchange.Meter` whose records are built elsewhere."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admin_path: str | None,
        journal: JournalWriter | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._admin_path = admin_path
        self._journal = journal
        self.journal_failures = 0
        self._admin: aiohttp.ClientSession | None = None
        self._warned = False
        #: Frames sent in one write every FLUSH_AFTER_S: fewer syscalls and record-process wake-ups.
        self._pending: list[bytes] = []
        self.lost_records = 0
        #: Set when the record process went away (EOF): the worker should stop taking calls.
        self.closed = asyncio.Event()
        self._watch = asyncio.get_running_loop().create_task(self._watch_peer(), name="llmtally-link")

    @classmethod
    async def connect(
        cls, path: str, admin_path: str | None = None, journal: JournalWriter | None = None
    ) -> LinkClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer, admin_path, journal)

    async def _watch_peer(self) -> None:
        with contextlib.suppress(OSError):
            await self._reader.read()  # the record process never writes: this returns at EOF
        self.closed.set()

    def _send(self, message: object) -> None:
        self._send_frame(_frame(message))

    def _send_frame(self, frame: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self._flush)
        self._pending.append(frame)

    def _flush(self) -> None:
        frames, self._pending = self._pending, []
        if not frames:  # close() flushed them already
            return
        if self._writer.is_closing():
            self.lost_records += len(frames)
            log.error("record process gone: %d exchanges not sent", len(frames))
            return
        self._writer.writelines(frames)
        if not self._warned and self._writer.transport.get_write_buffer_size() > BACKLOG_WARNING_BYTES:
            self._warned = True
            log.warning(
                "the record process is behind: over %d MB of exchanges waiting", BACKLOG_WARNING_BYTES >> 20
            )

    def submit(self, exchange: Exchange) -> None:
        """Called in the callback that sent the client its last byte: the journal append comes first
        (one write), so a SIGKILL from here on still leaves the call its record after a restart."""
        try:
            frame = _frame(exchange_to_wire(exchange))
        except Exception:  # never let metering break the caller's traffic
            self.lost_records += 1
            log.exception("could not encode the exchange of request %s", exchange.request_id)
            return
        journaled = self._journal is not None and self._append_to_journal(frame)
        if self.closed.is_set() or self._writer.is_closing():
            if journaled:
                return  # the next start of the record process replays it
            self.lost_records += 1
            log.error(
                "record process gone: no record for request %s (%d lost)",
                exchange.request_id,
                self.lost_records,
            )
            return
        self._send_frame(frame)
        if journaled:
            self._rotate_journal()

    def _append_to_journal(self, frame: bytes) -> bool:
        journal = self._journal
        assert journal is not None
        try:
            if not journal.is_open:
                path = journal.open()
                if not self.closed.is_set():
                    self._send(SegmentOpened(path))  # before the frame: the link keeps the order
            journal.append(frame)
        except OSError as exc:  # disk full, read-only: the record still travels the link
            self.journal_failures += 1
            if self.journal_failures == 1 or self.journal_failures % 10_000 == 0:
                log.error("journal append failed (%d so far): %s", self.journal_failures, exc)
            return False
        return True

    def _rotate_journal(self) -> None:
        journal = self._journal
        if journal is not None and journal.is_open and journal.full:
            self._seal_journal()

    def _seal_journal(self) -> None:
        journal = self._journal
        if journal is None or not journal.is_open:
            return
        try:
            path, frames = journal.seal()
        except OSError as exc:
            log.error("journal segment not closed cleanly: %s", exc)
            return
        if not self.closed.is_set():
            self._send(SegmentSealed(path, frames))

    def send_ready(self, port: int) -> None:
        self._send(WorkerReady(os.getpid(), port))

    async def metrics(self) -> bytes | None:
        """The record process's Prometheus exposition, fetched over its admin socket."""
        if self._admin_path is None:
            return None
        if self._admin is None:
            self._admin = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(self._admin_path),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        async with self._admin.get("http://llmtally/metrics") as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.read()

    async def close(self) -> None:
        """Send what is buffered, then close (the record process sees EOF and knows we are done)."""
        if self._admin is not None:
            await self._admin.close()
        self._seal_journal()
        if self._pending:
            self._flush()
        with contextlib.suppress(OSError):
            if not self._writer.is_closing():
                await self._writer.drain()
                self._writer.write_eof()
                # Wait for the record process to close its end: everything sent has been read.
                await asyncio.wait_for(self.closed.wait(), 30)
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await self._writer.wait_closed()
        self._watch.cancel()


class LinkServer:
    """The record process's end: reads frames from every worker and hands each exchange on."""

    def __init__(
        self,
        path: str,
        on_exchange: Callable[[Exchange], None],
        on_ready: Callable[[WorkerReady], None],
        journal: JournalTracker | None = None,
    ) -> None:
        self.path = path
        self._on_exchange = on_exchange
        self._on_ready = on_ready
        self._journal = journal
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        #: The worker process at the other end of each open connection (SO_PEERCRED): the
        #: journal leaves a live worker's segments alone, whatever it has yet to send.
        self._peers: dict[asyncio.Task[None], int] = {}
        self.received = 0

    def live_pids(self) -> set[int]:
        return set(self._peers.values())

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accept, self.path)
        os.chmod(self.path, 0o600)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        pid = _peer_pid(writer)
        if pid is not None:
            self._peers[task] = pid
        try:
            await self._read(reader)
        finally:
            self._connections.discard(task)
            self._peers.pop(task, None)
            writer.close()  # the worker waits for this: all it sent was read

    async def _read(self, reader: asyncio.StreamReader) -> None:
        journal = self._journal
        segment: str | None = None  # the journal segment the worker's next exchanges are in
        while True:
            try:
                header = await reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                if size >= MAX_FRAME:
                    log.error("link frame of %d bytes refused; closing the connection", size)
                    return
                message = pickle.loads(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the worker closed (or died); what it finished sending was handled
            except Exception:
                log.exception("unreadable link frame; closing the connection")
                return
            if isinstance(message, WorkerReady):
                self._on_ready(message)
            elif isinstance(message, tuple):
                self.received += 1
                if journal is not None and segment is not None:
                    journal.received(segment, message[0])
                self._on_exchange(exchange_from_wire(message))
            elif isinstance(message, SegmentOpened):
                segment = message.path
                if journal is not None:
                    journal.opened(segment)
            elif isinstance(message, SegmentSealed):
                segment = None
                if journal is not None:
                    journal.sealed(message.path, message.frames)
            else:
                log.error("unknown link message %r", type(message).__name__)

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until every worker has disconnected; False if some are still connected after ``within_s``."""
        if not self._connections:
            return True
        _, pending = await asyncio.wait(set(self._connections), timeout=within_s)
        return not pending

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _peer_pid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return int(pid)
