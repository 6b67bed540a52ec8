"""A length-delimited protobuf file sink for ``llmtally.v1.UsageRecord`` (schema: proto/usage_record.proto).

Each message is written as its size (a base-128 varint) followed by its bytes, the framing protobuf's
``writeDelimitedTo``/``parseDelimitedFrom`` use. Money is units + nanos: costs are rounded half-even to
9 decimal places (the JSON records keep 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from llmtally.pipeline.proto import usage_record_pb2 as pb
from llmtally.pipeline.sinks import unrenderable
from llmtally.pipeline.threads import SerialThread

NANO = Decimal("1e-9")
_OPTIONAL = ("reasoning_tokens", "ttfb_ms", "error", "estimated_input_tokens", "upstream_request_id",
             "service_tier", "priced_model", "pricing_note", "inference_geo", "batch_id",
             "custom_id", "session_id")  # fmt: skip
_PLAIN = ("request_id", "provider", "endpoint", "request_model", "model", "stream", "input_tokens",
          "output_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "total_tokens",
          "usage_source", "price_source", "price_version", "latency_ms", "client_disconnected",
          "input_audio_tokens", "output_audio_tokens", "input_image_tokens", "output_image_tokens",
          "cache_read_audio_tokens", "fake_upstream", "platform")  # fmt: skip


def money(value: Any, currency: str = "USD") -> pb.Money:
    amount = Decimal(str(value)).quantize(NANO, rounding=ROUND_HALF_EVEN)
    units = int(amount)  # truncates toward zero, so nanos share the sign of units
    nanos = int((amount - units) / NANO)
    return pb.Money(currency_code=currency, units=units, nanos=nanos)


def money_value(m: pb.Money) -> Decimal:
    return Decimal(m.units) + Decimal(m.nanos) * NANO


def to_message(record: dict[str, Any]) -> pb.UsageRecord:
    message = pb.UsageRecord()
    message.timestamp.FromDatetime(datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")))
    for key in _PLAIN:
        value = record.get(key)
        if value is not None:
            setattr(message, key, value)
    for key in _OPTIONAL:
        if record.get(key) is not None:
            setattr(message, key, record[key])
    message.status = int(record.get("status") or 0)
    currency = str(record.get("currency") or "USD")
    for key in ("input_cost", "output_cost", "total_cost"):
        if record.get(key) is not None:
            getattr(message, key).CopyFrom(money(record[key], currency))
    message.tags.update({str(k): str(v) for k, v in (record.get("tags") or {}).items()})
    for item in record.get("line_items") or ():
        line = message.line_items.add(
            item=str(item.get("item")), quantity=int(item.get("quantity") or 0), unit=str(item.get("unit")),
            source=str(item.get("source")),
        )  # fmt: skip
        for key in ("unit_price", "cost"):
            if item.get(key) is not None:
                getattr(line, key).CopyFrom(money(item[key], currency))
    return message


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_delimited(messages: list[pb.UsageRecord]) -> bytes:
    parts = []
    for message in messages:
        data = message.SerializeToString()
        parts.append(_varint(len(data)) + data)
    return b"".join(parts)


def read_delimited(path: str | Path) -> Iterator[pb.UsageRecord]:
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        size = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        message = pb.UsageRecord()
        message.ParseFromString(data[pos : pos + size])
        pos += size
        yield message


class ProtobufFileSink:
    def __init__(self, path: str) -> None:
        self.name = f"protobuf:{path}"
        self._path = path
        self._thread = SerialThread(self.name)

    async def write(self, records: list[dict[str, Any]]) -> None:
        messages, bad = [], []
        for record in records:  # one at a time: a record protobuf refuses never takes the batch with it
            try:
                messages.append(to_message(record))
            except (KeyError, TypeError, ValueError, ArithmeticError):
                bad.append(record)
        if messages:
            await self._thread.run(self._append, encode_delimited(messages))
        if bad:
            raise unrenderable(bad)

    def _append(self, data: bytes) -> None:
        with open(self._path, "ab") as fh:
            fh.write(data)
            fh.flush()

    async def close(self) -> None:
        return None
