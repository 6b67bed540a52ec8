"""SIGTERM to ``llmtally serve`` with open streams and a sink far behind: every record delivered once,
exit 0 within the bound; and with a sink that hangs and a spill dir that fails, still exit 0 in time."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from llmtally.testing import FakeUpstream
from tests.conftest import API_KEY
from tests.proxy.test_server import STREAM, serving

CHAT = b'{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}'
GRACE_S = 20.0
CLOSE_S = 20.0


class GatedReceiver:
    """A webhook receiver that holds every POST until ``opened`` (a sink far behind), or for ever."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.stored: Counter[str] = Counter()
        self.waiting = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.waiting += 1
        await self.opened.wait()
        self.stored.update(r["request_id"] for r in orjson.loads(body)["records"])
        return web.json_response({"ok": True})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/ingest"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def _drain(stream: asyncio.StreamReader | None, into: bytearray) -> None:
    # Read stdout and stderr all along: a full pipe would block the serve process's sinks and logs.
    assert stream is not None
    while chunk := await stream.read(65536):
        into += chunk


async def _delivered_to(session: aiohttp.ClientSession, url: str, sink: str) -> float:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(f'llmtally_records_delivered_total{{sink="{sink}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until_on_stdout(session: aiohttp.ClientSession, url: str, count: int) -> None:
    """Poll the process's /metrics until its stdout sink delivered ``count`` records (at most 60 s)."""
    for _ in range(600):
        if await _delivered_to(session, url, "jsonl:stdout") >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {count} records reached stdout")


def _config(tmp_path: Path, upstream: str, webhook: str, spill_dir: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nanthropic = "{upstream}"\n[server]\nshutdown_grace_s = {GRACE_S}\n'
        f'[pipeline]\nspill_dir = "{spill_dir}"\nsink_timeout_s = 60.0\nretry_attempts = 1\nsink_queue = 4\n'
        f"close_timeout_s = {CLOSE_S}\n"
        f'[sinks.webhook]\nurl = "{webhook}"\ntimeout_s = 60.0\n'
    )
    return config


async def test_sigterm_with_200_open_streams_and_500_queued_records_delivers_each_once(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.config.chunks = 20
    upstream.config.chunk_interval_s = 0.4  # each stream lasts about 8 s, past the SIGTERM
    receiver = GatedReceiver()
    webhook = await receiver.start()
    config = _config(tmp_path, upstream.url, webhook, tmp_path / "spill")
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    stdout, stderr = bytearray(), bytearray()
    try:
        async with serving(config, {}) as (process, url):
            readers = [asyncio.create_task(_drain(process.stdout, stdout)),
                       asyncio.create_task(_drain(process.stderr, stderr))]  # fmt: skip
            connector = aiohttp.TCPConnector(limit=300)
            async with aiohttp.ClientSession(connector=connector) as session:
                gate = asyncio.Semaphore(50)

                async def call() -> None:
                    async with (
                        gate,
                        session.post(url + "/anthropic/v1/messages", data=CHAT, headers=headers) as r,
                    ):
                        assert r.status == 200
                        await r.read()

                await asyncio.gather(*(call() for _ in range(500)))
                await _until_on_stdout(session, url, 500)  # the 500 records reached the pipeline
                assert receiver.stored == Counter()  # …and all 500 wait for the webhook

                streams = [
                    await session.post(url + "/anthropic/v1/messages", data=STREAM, headers=headers)
                    for _ in range(200)
                ]
                for response in streams:  # every stream has started
                    assert response.status == 200
                    assert (await response.content.readany()).startswith(b"event: message_start")
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                receiver.opened.set()  # the sink catches up, from now on
                rests = await asyncio.gather(*(response.read() for response in streams))
                assert all(rest.endswith(b'data: {"type":"message_stop"}\n\n') for rest in rests)
            async with asyncio.timeout(GRACE_S + CLOSE_S + 10):  # the bound the docs promise, plus start-up
                await asyncio.gather(*readers)
                await process.wait()
            took = time.monotonic() - signalled
    finally:
        await receiver.stop()
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert took < GRACE_S + CLOSE_S, took
    print(f"700 records, 200 streams open: exit 0 {took:.1f} s after SIGTERM")  # a figure for the docs
    records = [orjson.loads(line) for line in stdout.splitlines()]
    on_stdout = Counter(r["request_id"] for r in records)
    assert len(on_stdout) == 700 and set(on_stdout.values()) == {1}
    assert Counter(r["stream"] for r in records) == {False: 500, True: 200}
    assert receiver.stored.keys() == on_stdout.keys() and set(receiver.stored.values()) == {1}
    assert "spilled records delivered" in stderr.decode()  # the sink fell behind: its spill was replayed
    assert not [p for p in (tmp_path / "spill").glob("*") if p.stat().st_size], "all delivered, nothing left"


async def test_sigterm_with_a_hanging_sink_and_a_failing_spill_still_exits_0_in_time(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    receiver = GatedReceiver()  # never opened: every webhook write hangs
    webhook = await receiver.start()
    spill_dir = tmp_path / "spill"
    spill_dir.write_text("a regular file: every spill write fails\n")
    config = _config(tmp_path, upstream.url, webhook, spill_dir)
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    stdout, stderr = bytearray(), bytearray()
    try:
        async with serving(config, {"LLMTALLY_PIPELINE_CLOSE_TIMEOUT_S": "3"}) as (process, url):
            readers = [asyncio.create_task(_drain(process.stdout, stdout)),
                       asyncio.create_task(_drain(process.stderr, stderr))]  # fmt: skip
            async with aiohttp.ClientSession() as session:
                for _ in range(30):
                    async with session.post(url + "/anthropic/v1/messages", data=CHAT, headers=headers) as r:
                        assert r.status == 200
                        await r.read()
                await _until_on_stdout(session, url, 30)
                for _ in range(600):
                    if receiver.waiting:  # the webhook's write hangs
                        break
                    await asyncio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            async with asyncio.timeout(GRACE_S + 3 + 10):
                await asyncio.gather(*readers)
                await process.wait()
            took = time.monotonic() - signalled
    finally:
        await receiver.stop()
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert took < GRACE_S + 3, took
    assert len(stdout.splitlines()) == 30  # the other sink got everything
    log = stderr.decode()
    assert "LOST for sink webhook:127.0.0.1" in log  # the webhook's records could not even be spilled
    assert log.count("LOST for sink webhook:127.0.0.1") == 1
    assert "Traceback" not in log
