"""Batch result downloads, metered as they pass: one exchange (so one record) per result.

The download is forwarded exactly as the unmetered passthrough forwards any GET: each chunk goes to
the client as it arrives, and only then is it fed here. JSON lines are split as they come
(:class:`~llmtally.providers.batch.JsonLines`): memory is one line at most (``[metering]
max_batch_line_mb``; a longer line is skipped and counted, and gets a record saying so when the
download is known to hold batch results), so a result file of hundreds of MB streams through in
constant memory. A Gemini batch operation is one JSON document: kept up to ``max_response_body_mb``
and read once it is complete.

Each result line becomes an :class:`~llmtally.exchange.Exchange` whose summary is already parsed
(its usage, model, status), with ``endpoint`` and ``service_tier`` ``batch`` and the batch and
custom ids; the record process prices it as any other (batch rates). Nothing here can fail the
download: a metering bug is logged and the rest of the download goes on unmetered.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import orjson

from llmtally.exchange import Exchange, Meter
from llmtally.platforms import Route
from llmtally.providers.base import MeteredRequest, ResponseSummary
from llmtally.providers.batch import BATCH, BatchDownload, BatchResult, JsonLines

log = logging.getLogger("llmtally.proxy")

#: Decoded bytes produced per step of a compressed download (a small gzip chunk can inflate a lot).
DECODE_STEP = 1024 * 1024
TOO_LONG = "batch result line longer than [metering] max_batch_line_mb: not metered"
TOO_LARGE = "batch operation larger than [metering] max_response_body_mb: its results are not metered"


class BatchCopy:
    """The meter's reading of one batch download; ``feed`` every forwarded chunk, then ``finish``."""

    __slots__ = (
        "_body", "_decoder", "_failed", "_lines", "_max_body", "_new_id", "_size", "_t0", "batch",
        "meter", "metered", "route", "started_at", "tags",
    )  # fmt: skip

    def __init__(
        self,
        meter: Meter,
        route: Route,
        batch: BatchDownload,
        *,
        encoding: str,
        tags: dict[str, str],
        t0: float,
        max_line: int,
        max_body: int,
        new_id: Callable[[], str],
    ) -> None:
        self.meter = meter
        self.route = route
        self.batch = batch
        self.tags = tags
        self.started_at = datetime.now(UTC)
        self._t0 = t0
        self._new_id = new_id
        encoding = encoding.lower()
        # wbits=47: zlib or gzip framing, detected from the header (as providers.encoding.Decoder).
        self._decoder = zlib.decompressobj(wbits=47) if encoding in ("gzip", "deflate", "x-gzip") else None
        self._lines = JsonLines(max_line)
        self._body: list[bytes] | None = [] if batch.framing == "json" else None
        self._size = 0
        self._max_body = max_body
        self._failed = False
        #: Results submitted so far.
        self.metered = 0

    def feed(self, chunk: bytes) -> None:
        """A chunk the client has been sent; never raises."""
        if self._failed:
            return
        try:
            for piece in self._decoded(chunk):
                self._take(piece)
        except Exception as exc:
            self._fail(exc)

    def finish(self, whole: bool) -> None:
        """The download ended (``whole``: completely; else cut off, and an unfinished line is not a
        result). Never raises."""
        if self._failed:
            return
        try:
            if whole and self._decoder is not None:
                self._take(self._decoder.flush())
            if self.batch.framing == "json":
                if whole:
                    self._read_whole()
                return
            last = self._lines.finish()
            if whole and last is not None:
                self._line(last)
            skipped = self._lines.skipped
            if skipped:
                log.warning(
                    "batch download %s: %d lines over max_batch_line_mb skipped", self.batch.batch_id, skipped
                )
                if self.metered or self.batch.results_only:
                    for _ in range(skipped):
                        self._submit(BatchResult(ResponseSummary(error=TOO_LONG), status=None))
        except Exception as exc:
            self._fail(exc)

    # ------------------------------------------------------------------------------------------

    def _decoded(self, chunk: bytes) -> Iterator[bytes]:
        """``chunk`` decoded, in pieces of at most DECODE_STEP bytes (each taken before the next)."""
        decoder = self._decoder
        if decoder is None:
            yield chunk
            return
        data = chunk
        while data:
            yield decoder.decompress(data, DECODE_STEP)
            data = decoder.unconsumed_tail

    def _take(self, data: bytes) -> None:
        if not data:
            return
        body = self._body
        if body is not None:
            self._size += len(data)
            if self._size > self._max_body:
                self._body = None
                self._submit(BatchResult(ResponseSummary(error=TOO_LARGE), status=None))
                self._failed = True  # nothing more to read of it
                return
            body.append(data)
            return
        for line in self._lines.feed(data):
            self._line(line)

    def _line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if self.batch.results_only:
                self._submit(BatchResult(ResponseSummary(error="batch result line is not JSON"), status=None))
            return
        read = self.batch.read_line
        result = read(obj) if read is not None else None
        if result is not None:
            self._submit(result)

    def _read_whole(self) -> None:
        body, self._body = self._body, None
        if not body:
            return
        try:
            obj = orjson.loads(b"".join(body))
        except orjson.JSONDecodeError:
            return  # not a batch operation: nothing to meter
        read = self.batch.read_whole
        for result in read(obj) if read is not None else ():
            self._submit(result)

    def _submit(self, result: BatchResult) -> None:
        summary = result.summary
        summary.service_tier = BATCH  # billed at batch rates, whatever the response body says
        request = MeteredRequest(
            endpoint=self.batch.endpoint,
            body=b"",
            model=summary.model,
            stream=False,
            payload=None,
            service_tier=BATCH,
        )
        route = self.route
        self.meter.submit(
            Exchange(
                request_id=self._new_id(),
                provider=route.dialect,
                platform=route.platform,
                request=request,
                started_at=self.started_at,
                summary=summary,
                status=result.status,
                latency_ms=(time.perf_counter() - self._t0) * 1000,
                tags=self.tags,
                upstream_request_id=summary.upstream_request_id,
                batch_id=self.batch.batch_id,
                custom_id=result.custom_id,
            )
        )
        self.metered += 1

    def _fail(self, exc: Exception) -> None:
        self._failed = True
        self._body = None
        if isinstance(exc, zlib.error):  # the upstream's bytes, not our bug: no traceback
            log.warning(
                "batch download %s: the body does not decode (%s); not metered", self.batch.batch_id, exc
            )
        else:
            log.exception("batch metering failed for %s; the rest is not metered", self.batch.batch_id)
