"""Run the fake upstream on its own: ``python -m llmtally.testing [--port P] [--latency-ms N] ...``.

Used by the load tests (so the upstream has its own process and core). Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from llmtally.testing.fake_upstream import FakeUpstream, FakeUpstreamConfig


async def _main(args: argparse.Namespace) -> None:
    config = FakeUpstreamConfig(
        latency_s=args.latency_ms / 1000,
        chunks=args.chunks,
        chunk_interval_s=args.chunk_interval_ms / 1000,
        piece_chars=args.piece_chars,
    )
    upstream = FakeUpstream(config)
    url = await upstream.start(port=args.port)
    print(f"fake upstream on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await upstream.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmtally.testing", description="the fake LLM upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before the response headers")
    parser.add_argument("--chunks", type=int, default=3, help="text pieces per response (stream chunks)")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0, help="delay between stream chunks")
    parser.add_argument("--piece-chars", type=int, default=0, help="characters per piece (0: a word)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(_main(args))
    else:
        uvloop.run(_main(args))


if __name__ == "__main__":
    main()
