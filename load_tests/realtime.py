"""WebSocket sessions through the proxy (OpenAI Realtime route): per-message added latency and memory
per idle session.

An echo upstream (its own process) answers every text message at once with a Realtime-shaped event
of the same size; ``llmtally serve`` (one worker, its own process) sits in front of it. ``--sessions``
concurrent sessions (default 100) each send ``--messages`` events one after another, direct to the
upstream and through the proxy, interleaved in ``--rounds`` rounds; the round trip of each is timed.
Added latency = the proxied round trip's percentile minus the direct one's (a round trip crosses the
proxy twice: once each way). Then ``--idle`` sessions are opened and left idle, and the worker's RSS
growth divided by their number is the memory per idle session.

    .venv/bin/python load_tests/realtime.py [--sessions 100] [--messages 50] [--idle 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

UPSTREAM = r"""
import asyncio, sys
from aiohttp import web, WSMsgType

CREATED = '{"type":"session.created","event_id":"e0","session":{"id":"s","model":"gpt-realtime"}}'

async def session(request):
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    await ws.send_str(CREATED)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
    return ws

async def main():
    app = web.Application()
    app.router.add_get("/v1/realtime", session)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""
#: A Realtime-shaped client event (an audio append of ~20 ms of 24 kHz PCM16, base64).
EVENT = '{"type":"input_audio_buffer.append","event_id":"evt_%06d","audio":"' + "A" * 1280 + '"}'


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _workers(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in found if b"llmtally.proxy.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


async def _session(
    http: aiohttp.ClientSession, url: str, messages: int, interval_s: float, out: list[float]
) -> None:
    async with http.ws_connect(url, headers={"Authorization": "Bearer sk-bench"}) as ws:
        await ws.receive()  # session.created
        await asyncio.sleep(random.random() * interval_s)  # sessions out of phase, as real ones are
        next_at = time.perf_counter()
        for i in range(messages):
            t0 = time.perf_counter()
            await ws.send_str(EVENT % i)
            await ws.receive()
            out.append((time.perf_counter() - t0) * 1000)
            next_at += interval_s
            if interval_s:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


async def _round(url: str, sessions: int, messages: int, interval_s: float) -> list[float]:
    out: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(_session(http, url, messages, interval_s, out) for _ in range(sessions)))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument(
        "--interval-ms", type=float, default=100.0,
        help="each session sends a message this often (0: back to back, a saturation test)",
    )  # fmt: skip
    args = parser.parse_args()

    upstream = await asyncio.create_subprocess_exec(
        sys.executable, "-c", UPSTREAM, stdout=asyncio.subprocess.PIPE
    )
    assert upstream.stdout is not None
    up_port = int((await upstream.stdout.readline()).decode())
    up_url = f"http://127.0.0.1:{up_port}"
    config = Path(tempfile.mkdtemp()) / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{up_url}"\n[logging]\ndestination = "{config.parent}/records.jsonl"\n'
        f"[realtime]\nmax_sessions = {max(args.idle, args.sessions) + 100}\n"
    )
    proxy = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0", "--workers", "1",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proxy.stderr is not None
    while True:
        line = await asyncio.wait_for(proxy.stderr.readline(), 30)
        match = re.search(rb"listening on (http://\S+)", line)
        if match:
            proxy_url = match.group(1).decode()
            break
    try:
        direct_url = f"{up_url}/v1/realtime?model=gpt-realtime"
        proxied_url = f"{proxy_url}/openai/v1/realtime?model=gpt-realtime"
        interval_s = args.interval_ms / 1000
        await _round(direct_url, 10, 10, 0)  # warm both
        await _round(proxied_url, 10, 10, 0)
        direct: list[float] = []
        proxied: list[float] = []
        for _ in range(args.rounds):
            direct += await _round(direct_url, args.sessions, args.messages, interval_s)
            proxied += await _round(proxied_url, args.sessions, args.messages, interval_s)
        pace = f"one every {args.interval_ms:g} ms" if args.interval_ms else "back to back"
        print(
            f"{args.sessions} concurrent sessions x {args.messages} messages ({pace}) x {args.rounds} "
            f"rounds: {len(proxied)} round trips per target, {len(EVENT)}-byte messages echoed"
        )
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            d, p = _percentile(direct, q), _percentile(proxied, q)
            print(f"  {name}: direct {d:.3f} ms, proxied {p:.3f} ms, added {p - d:.3f} ms per round trip")
        print(f"  mean: direct {statistics.fmean(direct):.3f} ms, proxied {statistics.fmean(proxied):.3f} ms")

        if not args.idle:
            return
        (worker,) = _workers(proxy.pid)
        await asyncio.sleep(1)
        before = _rss_kb(worker)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            idle = []
            for _ in range(args.idle):
                ws = await http.ws_connect(proxied_url, headers={"Authorization": "Bearer sk-bench"})
                await ws.receive()
                idle.append(ws)
            await asyncio.sleep(2)
            after = _rss_kb(worker)
            print(f"  {args.idle} idle sessions: worker RSS {before / 1024:.1f} -> {after / 1024:.1f} MB, "
                  f"{(after - before) / args.idle:.1f} KB per idle session")  # fmt: skip
            for ws in idle:
                await ws.close()
    finally:
        for process in (proxy, upstream):
            if process.returncode is None:
                process.terminate()
                await process.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
