"""What metering a batch result download costs a proxy worker: the numbers behind docs/performance.md.

A worker forwards each chunk of a batch download and then feeds it to
:class:`llmtally.proxy.batch_copy.BatchCopy`, which splits the JSON lines, reads each result and hands
its exchange to the meter; under ``llmtally serve`` that is the link, which encodes the exchange as a
frame. This times exactly that, on the worker's side, for an OpenAI output file and an Anthropic
results file of ``--mb`` MB with answers of ``--answer-chars`` characters, fed in 64 KiB chunks (as a
socket delivers them), optionally gzip-compressed.

    .venv/bin/python load_tests/batch_cost.py [--mb 50] [--answer-chars 1500] [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import time
from typing import Any

import orjson
from yarl import URL

from llmtally.exchange import Exchange
from llmtally.pipeline.link import _frame, exchange_to_wire
from llmtally.platforms import Route
from llmtally.providers import ADAPTERS
from llmtally.proxy.batch_copy import BatchCopy

CHUNK = 64 * 1024


class LinkEncoding:
    """A meter that does what a worker's LinkClient does to each exchange: encode it as a frame."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def submit(self, exchange: Exchange) -> None:
        frame = _frame(exchange_to_wire(exchange))
        self.frames += 1
        self.bytes += len(frame)

    async def metrics(self) -> bytes | None:
        return None


def openai_line(n: int, text: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{n}", "custom_id": f"request-{n}",
        "response": {"status_code": 200, "request_id": f"req_{n}", "body": {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1711652795,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
                      "prompt_tokens_details": {"cached_tokens": 0}}}},
        "error": None,
    }  # fmt: skip


def anthropic_line(n: int, text: str) -> dict[str, Any]:
    return {
        "custom_id": f"req-{n}",
        "result": {"type": "succeeded", "message": {
            "id": f"msg_{n}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1000, "output_tokens": 300, "service_tier": "batch"}}},
    }  # fmt: skip


def file_of(make: Any, size: int, text: str) -> tuple[bytes, int]:
    lines, total, n = [], 0, 0
    while total < size:
        line = orjson.dumps(make(n, text)) + b"\n"
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines), n


def run(provider: str, path: str, body: bytes, lines: int, compressed: bool) -> None:
    adapter = ADAPTERS[provider]  # type: ignore[index]
    batch = adapter.batch_route(path)
    assert batch is not None
    route = Route("direct", provider, provider, None, URL("http://upstream"), batch=batch)  # type: ignore[arg-type]
    data = gzip.compress(body, 6) if compressed else body
    meter = LinkEncoding()
    ids = iter(range(10**9))
    copy = BatchCopy(
        meter, route, batch, encoding="gzip" if compressed else "identity", tags={}, t0=time.perf_counter(),
        max_line=8 << 20, max_body=64 << 20, new_id=lambda: f"{next(ids):032x}",
    )  # fmt: skip
    start = time.process_time()
    for i in range(0, len(data), CHUNK):
        copy.feed(data[i : i + CHUNK])
    copy.finish(True)
    cpu = time.process_time() - start
    assert meter.frames == lines, (meter.frames, lines)
    mb = len(body) / 2**20
    print(
        f"{provider:9} {mb:6.1f} MB{' gzip' if compressed else '     '} {lines:7d} results: "
        f"{cpu:6.3f} s CPU, {cpu / lines * 1e6:6.1f} µs a result, {mb / cpu:6.0f} MB/s, "
        f"frames {meter.bytes / 2**20:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--answer-chars", type=int, default=1500)
    parser.add_argument("--gzip", action="store_true")
    args = parser.parse_args()
    text = ("lorem ipsum dolor sit amet " * (args.answer_chars // 27 + 1))[: args.answer_chars]
    size = int(args.mb * 2**20)
    body, lines = file_of(openai_line, size, text)
    run("openai", "v1/files/file-abc/content", body, lines, args.gzip)
    body, lines = file_of(anthropic_line, size, text)
    run("anthropic", "v1/messages/batches/msgbatch_1/results", body, lines, args.gzip)


if __name__ == "__main__":
    main()
