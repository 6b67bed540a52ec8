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


class _Lines:
    """structlog's final 'logger': collects rendered lines for one batched write."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def msg(self, message: bytes) -> None:
        self.lines.append(message)

    info = msg


def render_records(records: list[dict[str, Any]]) -> bytes:
    """Records as JSON lines, through the structlog processor chain (orjson renderer)."""
    lines = _Lines()
    logger = structlog.wrap_logger(
        lines,
        processors=[
            _decimals_as_json_numbers,
            _event_first,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
    )
    for record in records:
        logger.info(**record)
    return b"".join(line + b"\n" for line in lines.lines)


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
