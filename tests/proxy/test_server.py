"""``llmtally serve`` as a real process: config file, env overrides, stdout records, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import orjson

from llmtally.testing import FakeUpstream
from tests.conftest import API_KEY

STREAM = b'{"model":"claude-sonnet-5","max_tokens":10,"stream":true,"messages":[]}'


async def _start_serve(config: Path, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmtally",
        "serve",
        "--config",
        str(config),
        "--port",
        "0",
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


async def test_serve_drains_streams_and_flushes_records_on_sigterm(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.config.chunks = 6
    upstream.config.chunk_interval_s = 0.25
    config = tmp_path / "config.toml"
    config.write_text(f'[upstreams]\nanthropic = "{upstream.url}"\n[server]\nshutdown_grace_s = 1.0\n')
    # The environment overrides the file (grace period long enough for the stream to finish).
    process, url = await _start_serve(config, {"LLMTALLY_SERVER_SHUTDOWN_GRACE_S": "20"})
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
    process, url = await _start_serve(config, {})
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with session.post(url + "/openai/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
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
