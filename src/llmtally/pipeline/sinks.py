"""Record sinks. A sink receives batches of record dicts and must not block the event loop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import MutableMapping
from decimal import Decimal
from typing import IO, Any, Protocol

import orjson
import structlog

#: Costs are written as JSON numbers rounded to this many decimal places (exact Decimal text).
COST_DECIMALS = Decimal(1).scaleb(-10)


class Sink(Protocol):
    name: str

    async def write(self, records: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


def decimal_text(value: Decimal) -> str:
    """A Decimal rounded to 10 places as plain JSON number text (no exponent, no trailing zeros)."""
    text = format(value.quantize(COST_DECIMALS).normalize(), "f")
    return "0" if text in ("-0", "") else text


def _decimals_as_json_numbers(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Fragment embeds the exact decimal text: no float rounding on the way to the log line.
    for key, value in event_dict.items():
        if isinstance(value, Decimal):
            event_dict[key] = orjson.Fragment(decimal_text(value))
    return event_dict


def _event_first(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {"event": event_dict.pop("event"), **event_dict}


#: The structlog processor chain every record line goes through, applied directly: one bound-logger
#: call per record cost more than the rendering itself (py-spy of the record process under load).
_CHAIN: tuple[Any, ...] = (
    _decimals_as_json_numbers,
    _event_first,
    structlog.processors.JSONRenderer(serializer=orjson.dumps),
)


def render_records(records: list[dict[str, Any]]) -> bytes:
    """Records as JSON lines, through the structlog processor chain (orjson renderer)."""
    lines = []
    for record in records:
        event: Any = dict(record)
        for processor in _CHAIN:
            event = processor(None, "info", event)
        lines.append(event)
        lines.append(b"\n")
    return b"".join(lines)


class JsonLinesSink:
    """One JSON object per line to stdout or an append-only file; nothing else goes there."""

    def __init__(self, destination: str = "stdout") -> None:
        self.name = f"jsonl:{destination}"
        self._owned = destination not in ("stdout", "-")
        self._stream: IO[bytes] = open(destination, "ab") if self._owned else sys.stdout.buffer  # noqa: SIM115

    async def write(self, records: list[dict[str, Any]]) -> None:
        data = render_records(records)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    async def close(self) -> None:
        if self._owned:
            self._stream.close()


class MemorySink:
    """Keeps records in a list (tests, the demo, and library users who want them in-process)."""

    def __init__(self) -> None:
        self.name = "memory"
        self.records: list[dict[str, Any]] = []

    async def write(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)

    async def close(self) -> None:
        return None


class RotatingFileSink:
    """JSON lines to a file that rotates by size: path → path.1 → … → path.N (oldest dropped)."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.name = f"file:{path}"
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backups

    async def write(self, records: list[dict[str, Any]]) -> None:
        data = render_records(records)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        import os

        try:
            size = os.path.getsize(self._path)
        except OSError:
            size = 0
        if size and size + len(data) > self._max_bytes:
            self._rotate()
        with open(self._path, "ab") as fh:
            fh.write(data)
            fh.flush()

    def _rotate(self) -> None:
        import os

        for i in range(self._backups - 1, 0, -1):
            older = f"{self._path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self._path}.{i + 1}")
        if self._backups > 0:
            os.replace(self._path, f"{self._path}.1")
        else:
            os.remove(self._path)

    async def close(self) -> None:
        return None


class CallbackSink:
    """Calls ``callback(record)`` for each record: sync callbacks in a thread, async ones awaited.

    Runs in the pipeline's own runner, so a slow or failing callback delays or fails only itself.
    """

    def __init__(self, callback: Any, name: str | None = None) -> None:
        self.name = name or f"hook:{getattr(callback, '__qualname__', 'callback')}"
        self._callback = callback
        self._is_async = asyncio.iscoroutinefunction(callback)

    async def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            if self._is_async:
                await self._callback(record)
            else:
                await asyncio.to_thread(self._callback, record)

    async def close(self) -> None:
        return None


def batch_key(records: list[dict[str, Any]]) -> str:
    """A stable idempotency key for a batch: the same records give the same key on every retry."""
    import hashlib

    digest = hashlib.sha256()
    for record in records:
        digest.update(str(record.get("request_id", "")).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


class WebhookSink:
    """POSTs each batch as ``{"records": [...]}`` with an ``Idempotency-Key`` header.

    The key is derived from the batch's request ids, so a retried or replayed batch carries the same
    key and a receiver that honours it stores every record exactly once.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, headers: dict[str, str] | None = None) -> None:
        from yarl import URL

        self.name = f"webhook:{URL(url).host}"
        self._url = url
        self._timeout = timeout_s
        self._headers = dict(headers or {})
        self._session: Any = None

    async def write(self, records: list[dict[str, Any]]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        body = b'{"records":[' + render_records(records).rstrip(b"\n").replace(b"\n", b",") + b"]}"
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch_key(records), **self._headers}
        async with self._session.post(self._url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"webhook answered {response.status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
