"""What the exchange journal costs a proxy worker per call: the numbers behind ``[pipeline] journal``.

A worker's ``LinkClient.submit`` already encodes each exchange as a link frame; the journal adds one
``write`` of that frame to an O_APPEND file (plus an fsync with ``journal_fsync``). This times, on this
machine's disk, for a small non-streamed chat call and for a streamed call whose metering copy is
64 KiB: the encoding the link always did, the journal append, and the append with fsync.

    .venv/bin/python load_tests/journal_cost.py [--calls 20000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from llmtally.exchange import Exchange
from llmtally.pipeline.journal import JournalWriter
from llmtally.pipeline.link import _frame, exchange_to_wire
from llmtally.providers import ADAPTERS


def _exchange(n: int, response: bytes, stream: bool) -> Exchange:
    adapter = ADAPTERS["openai"]
    endpoint = adapter.route("v1/chat/completions")
    assert endpoint is not None
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hello number %d"}]}' % n
    request = adapter.prepare(endpoint, body, {}, inject_stream_usage=stream)
    return Exchange(
        request_id=f"{n:032x}",
        provider="openai",
        request=request,
        started_at=datetime.now(UTC),
        response_body=None if stream else response,
        response_chunks=[response] if stream else None,
        response_stream=stream,
        status=200,
        latency_ms=51.5,
        tags={"tenant": "acme"},
    )


def _per_call_us(calls: int, step: Callable[[int], None]) -> float:
    start = time.perf_counter()
    for n in range(calls):
        step(n)
    return (time.perf_counter() - start) / calls * 1e6


def _append_and_rotate(writer: JournalWriter, frame: bytes) -> None:
    """As in a worker, with its segments deleted once sealed (the record process deletes a sealed
    segment once delivered, usually long before the kernel would write it back to disk)."""
    if not writer.is_open:
        writer.open()
    writer.append(frame)
    if writer.full:
        path, _ = writer.seal()
        Path(path).unlink()


def _row(label: str, exchanges: list[Exchange], calls: int, root: Path) -> None:
    frames = [_frame(exchange_to_wire(e)) for e in exchanges]
    count = len(frames)
    encode = _per_call_us(calls, lambda n: _frame(exchange_to_wire(exchanges[n % count])))
    writer = JournalWriter(root, "bench", segment_bytes=16 << 20, fsync=False)
    append = _per_call_us(calls, lambda n: _append_and_rotate(writer, frames[n % count]))
    fsynced = JournalWriter(root, "bench", segment_bytes=1 << 62, fsync=True)
    fsynced.open()
    synced = _per_call_us(max(200, calls // 50), lambda n: fsynced.append(frames[n % count]))
    fsynced.seal()
    size = sum(map(len, frames)) // count
    print(f"{label:<22}{size:>7}B{encode:>10.2f}{append:>10.2f}{synced:>10.1f}")
    for path in root.glob("bench-*.jnl"):
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--dir", default="", help="journal directory (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="llmtally-journal-bench-"))
    small = b'{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,'
    small += b'"message":{"role":"assistant","content":"Hello there!"}}],"usage":{"prompt_tokens":9,'
    small += b'"completion_tokens":3,"total_tokens":12}}'
    cases = {"chat, 300 B answer": (small, False), "stream, 64 KiB copy": (b"data: x\n\n" * 7282, True)}
    print(f"journal in {root}, {args.calls} calls per row (µs per call)")
    print(f"{'call':<22}{'frame':>8}{'encode':>10}{'append':>10}{'+fsync':>10}")
    for label, (response, stream) in cases.items():
        _row(label, [_exchange(n, response, stream) for n in range(1000)], args.calls, root)
    if not args.dir:
        root.rmdir()


if __name__ == "__main__":
    main()
