"""``llmtally serve`` as a real process: config file, env overrides, stdout records, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from llmtally.testing import FakeUpstream
from tests.conftest import API_KEY
from tests.proxy.helpers import serve_post

STREAM = b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}'


async def start_serve(
    config: Path, env: dict[str, str], *args: str
) -> tuple[asyncio.subprocess.Process, str]:
    """``llmtally serve`` on a free port; returns when it says it is listening."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmtally",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    assert process.stderr is not None
    seen = b""
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        seen += line
        assert line, f"llmtally serve exited early: {seen.decode()}"
        match = re.search(rb"listening on (http://\S+)", line)
        if match:
            return process, match.group(1).decode()


@contextlib.asynccontextmanager
async def serving(
    config: Path, env: dict[str, str], *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """:func:`start_serve`, and the process killed on the way out if a test left it running."""
    process, url = await start_serve(config, env, *args)
    try:
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stop_serve(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """SIGTERM; its stdout and stderr once it exited, which it must do with status 0."""
    process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    return stdout, stderr


async def test_serve_drains_streams_and_flushes_records_on_sigterm(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.config.chunks = 6
    upstream.config.chunk_interval_s = 0.25
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nanthropic = "{upstream.url}"\n[server]\nshutdown_grace_s = 1.0\n')
    # The environment overrides the file (grace period long enough for the stream to finish).
    process, url = await start_serve(config, {"LLMTALLY_SERVER_SHUTDOWN_GRACE_S": "20"})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url + "/anthropic/v1/messages", data=STREAM, headers={"x-api-key": API_KEY}
            ) as response:
                first = await response.content.readany()
                assert first.startswith(b"event: message_start")
                process.send_signal(signal.SIGTERM)
                rest = await response.read()
            assert rest.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
            # No new connections once draining started.
            try:
                async with session.get(url + "/healthz") as late:
                    refused = late.status >= 500
            except aiohttp.ClientConnectionError:
                refused = True
            assert refused
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    lines = stdout.decode().splitlines()
    assert len(lines) == 1, stdout  # stdout carries records and nothing else
    record = orjson.loads(lines[0])
    assert record["event"] == "llm.usage"
    assert (record["provider"], record["stream"], record["output_tokens"]) == ("anthropic", True, 400)
    assert record["client_disconnected"] is False
    assert API_KEY not in stdout.decode() + stderr.decode()


async def test_bad_config_is_refused_with_key_and_problem(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = "eighty"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert stdout == b""
    assert f"{config}:2: [server] port: expected an integer, got str 'eighty'" in stderr.decode()


async def test_sighup_reloads_prices_without_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = tmp_path / "config.toml"
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'

    def write(rate: int) -> None:
        config.write_text(
            f'[upstreams]\nopenai = "{upstream.url}"\n[pricing]\nreload_interval_s = 0\n'
            f'[pricing.models."gpt-4o"]\ninput = {rate}\noutput = 0\n'
        )

    write(1)
    process, url = await start_serve(config, {})
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with session.post(url + "/openai/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
            # The record is built in the main process: wait until it has the call, so this test
            # reloads after the first call was priced, not while its exchange is still in flight.
            for _ in range(500):
                if b"llmtally_requests_total{" in await (await session.get(url + "/metrics")).read():
                    break
                await asyncio.sleep(0.02)
            write(2)
            process.send_signal(signal.SIGHUP)
            assert process.stderr is not None
            while b"prices reloaded" not in await asyncio.wait_for(process.stderr.readline(), 30):
                pass
            async with session.post(url + "/openai/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
        process.send_signal(signal.SIGTERM)
        stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    first, second = (orjson.loads(line) for line in stdout.splitlines())
    assert (first["input_cost"], second["input_cost"]) == (
        0.0012,
        0.0024,
    )  # 1200 tokens at $1, then $2 per 1M
    assert first["price_version"] != second["price_version"]
    assert process.returncode == 0


async def test_sigterm_delivers_every_queued_record(tmp_path: Path, upstream: FakeUpstream) -> None:
    """500 records queued behind a slow sink and streams in flight at SIGTERM: all delivered, exit 0."""
    from aiohttp import web

    received: list[str] = []

    async def ingest(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)  # a slow receiver: records pile up in the queue
        received.extend(r["request_id"] for r in orjson.loads(await request.read())["records"])
        return web.json_response({})

    runner, receiver = await serve_post("/ingest", ingest)
    hook = f"{receiver}/ingest"

    upstream.config.chunks = 6
    upstream.config.chunk_interval_s = 0.2
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{upstream.url}"\nanthropic = "{upstream.url}"\n'
        f'[pipeline]\nbatch_size = 5\nspill_dir = "{tmp_path / "spill"}"\n'
        f'[sinks.webhook]\nurl = "{hook}"\n'
    )
    process, url = await start_serve(config, {})
    chat = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    try:
        async with aiohttp.ClientSession() as session:
            semaphore = asyncio.Semaphore(50)

            async def call() -> None:
                async with (
                    semaphore,
                    session.post(
                        url + "/openai/v1/chat/completions",
                        data=chat,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                    ) as r,
                ):
                    await r.read()

            await asyncio.gather(*(call() for _ in range(500)))
            # Streams still running when SIGTERM arrives.
            streams = [
                await session.post(
                    url + "/anthropic/v1/messages", data=STREAM, headers={"x-api-key": API_KEY}
                )
                for _ in range(3)
            ]
            for response in streams:
                await response.content.readany()
            process.send_signal(signal.SIGTERM)
            for response in streams:
                assert (await response.read()).endswith(b'data: {"type":"message_stop"}\n\n')
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await runner.cleanup()
    assert process.returncode == 0, stderr.decode()
    ids = [orjson.loads(line)["request_id"] for line in stdout.splitlines()]
    assert len(ids) == 503
    assert sorted(received) == sorted(ids)  # every record reached the webhook before exit
