"""AWS event-stream frames, written the way Bedrock writes them, for fake upstreams and tests.

Only the writing side lives here: llmtally reads frames with botocore's own parser
(:mod:`llmtally.platforms.bedrock`), and the tests check that what this writes is what boto3 reads.
"""

from __future__ import annotations

import base64
import struct
import zlib

import orjson

#: Header value type 7: a UTF-8 string (the only type Bedrock's response frames use).
_STRING = 7


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One message: prelude (total and headers length, CRC32), string headers, payload, CRC32."""
    encoded = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        encoded += struct.pack(">B", len(raw_name)) + raw_name
        encoded += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(event_type: str, payload: bytes) -> bytes:
    """An ``event`` message of ``event_type`` with a JSON payload."""
    return frame(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}, payload
    )


def invoke_chunk(inner_event: dict[str, object]) -> bytes:
    """An InvokeModelWithResponseStream ``chunk``: the model's own event, base64 in ``{"bytes": …}``."""
    inner = base64.b64encode(orjson.dumps(inner_event)).decode()
    return event("chunk", orjson.dumps({"bytes": inner, "p": "abcdefghijkl"}))


def exception(exception_type: str, message: str) -> bytes:
    """An ``exception`` message (e.g. ``throttlingException``) as Bedrock sends mid-stream."""
    return frame(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        orjson.dumps({"message": message}),
    )
