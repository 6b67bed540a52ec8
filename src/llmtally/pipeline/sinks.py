"""Record sinks. A sink receives batches of record dicts and must not block the event loop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import MutableMapping
from decimal import Decimal
from typing import IO, Any, Protocol

import orjson
import structlog

from llmtally.pipeline.threads import SerialThread

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
    items = event_dict.get("line_items")
    if items:  # their unit prices and costs are money too
        event_dict["line_items"] = [
            {k: orjson.Fragment(decimal_text(v)) if isinstance(v, Decimal) else v for k, v in item.items()}
            if isinstance(item, dict)
            else item
            for item in items
        ]
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


def render_record(record: dict[str, Any]) -> bytes:
    """One record as one JSON line (no newline), through the structlog processor chain (orjson renderer).

    Raises (``TypeError``, orjson's ``JSONEncodeError``) for a record that cannot be JSON: a lone
    surrogate in a string, an integer past 64 bits, an object orjson does not know.
    """
    event: Any = dict(record)
    for processor in _CHAIN:
        event = processor(None, "info", event)
    return event  # type: ignore[no-any-return]


def check_renderable(record: dict[str, Any]) -> None:
    """Raise as :func:`render_record` would for what can never be JSON (a lone surrogate, an int past
    64 bits, a key that is not a string), at a fifth of its cost: orjson alone. Other objects pass, as
    the renderer writes their ``repr``; one whose repr cannot be JSON is refused by the sinks' own
    per-record rendering instead."""
    orjson.dumps(record, default=_as_null)


def _as_null(_: Any) -> None:
    return None


def render_records(records: list[dict[str, Any]]) -> bytes:
    """Records as JSON lines; raises if any cannot be rendered (see :func:`render_each`)."""
    return b"".join(render_record(record) + b"\n" for record in records)


def render_each(records: list[dict[str, Any]]) -> tuple[bytes, list[dict[str, Any]]]:
    """The JSON lines of the records that render, and the records that do not (each rendered alone,
    so one that cannot be JSON never takes its neighbours with it)."""
    lines: list[bytes] = []
    unrenderable: list[dict[str, Any]] = []
    for record in records:
        try:
            lines.append(render_record(record))
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            unrenderable.append(record)
            continue
        lines.append(b"\n")
    return b"".join(lines), unrenderable


def fallback_render(value: Any) -> bytes:
    """JSON for anything, losing nothing readable: lone surrogates as ``\\udcXX`` text, integers past
    64 bits and unknown objects as strings. For quarantined records only."""
    try:
        return orjson.dumps(_printable(value), default=str)
    except Exception:  # pragma: no cover - _printable leaves nothing orjson refuses; this must not fail
        return orjson.dumps({"repr": _printable(repr(value))})


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, Decimal):
        try:
            return orjson.Fragment(decimal_text(value))
        except ArithmeticError:  # too large to round to 10 places (a cost from absurd usage), or NaN
            return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(_printable(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return _printable(str(value))


class RecordsRejected(Exception):
    """Raised by a sink that wrote every record of a batch except ``records``.

    ``permanent``: trying again cannot help (the records cannot be rendered for this sink); otherwise
    the runner retries them alone and quarantines what the sink still refuses.
    """

    def __init__(self, records: list[dict[str, Any]], reason: str, *, permanent: bool) -> None:
        super().__init__(f"{len(records)} record(s) rejected: {reason}")
        self.records = records
        self.reason = reason
        self.permanent = permanent


class BatchRefused(Exception):
    """Raised by a sink whose receiver answered and refused the batch for what it holds (a webhook's
    400, 413 or 422), as opposed to being unreachable or failing: some record in it may be the reason,
    so the runner splits the batch to find it. Any other exception means the sink is down."""


#: Webhook answers that refuse a batch for its content (any other failure status means "down").
REFUSING_STATUSES = frozenset({400, 413, 415, 422})


def unrenderable(records: list[dict[str, Any]]) -> RecordsRejected:
    return RecordsRejected(records, "unrenderable", permanent=True)


class JsonLinesSink:
    """One JSON object per line to stdout or an append-only file; nothing else goes there."""

    def __init__(self, destination: str = "stdout") -> None:
        self.name = f"jsonl:{destination}"
        self._owned = destination not in ("stdout", "-")
        self._stream: IO[bytes] = open(destination, "ab") if self._owned else sys.stdout.buffer  # noqa: SIM115
        self._thread = SerialThread(self.name)

    async def write(self, records: list[dict[str, Any]]) -> None:
        data, bad = render_each(records)
        if data:
            await self._thread.run(self._write, data)
        if bad:
            raise unrenderable(bad)

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
        self._thread = SerialThread(self.name)

    async def write(self, records: list[dict[str, Any]]) -> None:
        data, bad = render_each(records)
        if data:
            await self._thread.run(self._write, data)
        if bad:
            raise unrenderable(bad)

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
        self._thread = SerialThread(self.name)

    async def write(self, records: list[dict[str, Any]]) -> None:
        # Every record gets its call: one that raises is reported back (retried alone, then
        # quarantined), never a reason to skip the others or to call them twice.
        failed: list[dict[str, Any]] = []
        first: Exception | None = None
        for record in records:
            try:
                if self._is_async:
                    await self._callback(record)
                else:
                    await self._thread.run(self._callback, record)
            except Exception as exc:
                failed.append(record)
                first = first or exc
        if failed:
            raise RecordsRejected(failed, f"{type(first).__name__}: {first}", permanent=False) from first

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
        data, bad = render_each(records)
        if bad:
            refused = {id(r) for r in bad}
            records = [r for r in records if id(r) not in refused]
        if records:
            body = b'{"records":[' + data.rstrip(b"\n").replace(b"\n", b",") + b"]}"
            key = batch_key(records)
            headers = {"Content-Type": "application/json", "Idempotency-Key": key, **self._headers}
            async with self._session.post(self._url, data=body, headers=headers) as response:
                if response.status in REFUSING_STATUSES:
                    raise BatchRefused(f"webhook answered {response.status}")
                if response.status >= 300:
                    raise RuntimeError(f"webhook answered {response.status}")
        if bad:
            raise unrenderable(bad)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
