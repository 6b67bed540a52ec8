"""``llmtally serve`` with two proxy workers: one pod's budget shared by both (memory store), and rules
reloaded on SIGHUP reaching the workers that check Redis themselves."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from llmtally.budgets.rules import to_nano
from llmtally.testing import FakeUpstream
from llmtally.testing.fake_upstream import FakeUsage
from llmtally.testing.redis_server import RedisServer

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
HONEST = FakeUsage(openai_prompt=20, openai_cached=0, openai_completion=50, openai_reasoning=0)
HEADERS = {"Authorization": "Bearer k", "x-llmtally-tag-tenant": "acme"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(path: Path, upstream: str, store: str, limit: str) -> None:
    path.write_text(
        f'[upstreams]\nopenai = "{upstream}"\n[pricing]\nreload_interval_s = 0\n'
        f'[budgets]\nstore = "{store}"\n'
        f'[[budgets.rules]]\nname = "t"\nmatch = {{ tag = "tenant" }}\nlimit_usd = "{limit}"\n'
    )


def _log(path: Path) -> Any:
    return open(path, "wb")  # handed to the process, closed once it has it


async def _serve(config: Path, tmp: Path) -> tuple[asyncio.subprocess.Process, str, str, Path]:
    records, log, admin = tmp / "records.jsonl", tmp / "stderr.log", _free_port()
    with _log(log) as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0",
            "--workers", "2", stdout=asyncio.subprocess.DEVNULL, stderr=err,
            env={**os.environ, "LLMTALLY_LOGGING_DESTINATION": str(records),
                 "LLMTALLY_SERVER_ADMIN_PORT": str(admin)},
        )  # fmt: skip
    for _ in range(600):
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if found:
            return process, found.group(1), f"http://127.0.0.1:{admin}", records
        assert process.returncode is None, log.read_text()
        await asyncio.sleep(0.05)
    raise AssertionError("llmtally serve did not start")


async def _calls(url: str, n: int) -> list[int]:
    async def one(session: aiohttp.ClientSession) -> int:
        async with session.post(url + "/openai/v1/chat/completions", json=CHAT, headers=HEADERS) as r:
            await r.read()
            return r.status

    # A new connection per call: the kernel spreads them over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(n))))


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_two_workers_share_the_pods_memory_budget(tmp_path: Path, upstream: FakeUpstream) -> None:
    # Usage a real model could give this request (20 in, 50 out of max_tokens 100): $0.00055, under
    # its reservation (~100 body bytes at $2.50/M + 100 at $10/M ≈ $0.00125). $0.01 admits ~8 of 40.
    upstream.config.usage = HONEST
    config = tmp_path / "config.toml"
    _config(config, upstream.url, "memory", "0.01")
    process, url, admin, records = await _serve(config, tmp_path)
    try:
        statuses = await _calls(url, 40)
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(admin + "/budgets") as got:
                    report: dict[str, Any] = await got.json()
                if report["settlements_pending"] == 0 and report["budgets"][0]["reserved_usd"] == "0":
                    break
                await asyncio.sleep(0.05)
    finally:
        await _stop(process)
    lines = [orjson.loads(line) for line in records.read_bytes().splitlines()]
    workers = {line["request_id"][:20] for line in lines}  # a per-process id prefix
    assert len(workers) == 2, "both workers took calls"
    admitted = [line for line in lines if line["status"] == 200]
    assert statuses.count(200) == len(admitted) and statuses.count(429) == 40 - len(admitted) > 0
    spent = sum(to_nano(Decimal(str(line["total_cost"]))) for line in admitted)
    assert report["budgets"][0]["spent_nano_usd"] == spent <= to_nano(Decimal("0.01"))


async def test_a_reloaded_limit_reaches_workers_that_check_redis_themselves(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = tmp_path / "config.toml"
    _config(config, upstream.url, redis_server.url, "100")
    process, url, _, records = await _serve(config, tmp_path)
    try:
        assert await _calls(url, 6) == [200] * 6
        # A worker prices its answer itself.
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/openai/v1/chat/completions", json=CHAT, headers=HEADERS) as r,
        ):
            await r.read()
            cost, request_id = r.headers["x-llmtally-cost"], r.headers["x-llmtally-request-id"]
            assert Decimal(r.headers["x-llmtally-budget-remaining"]) < 100
        _config(config, upstream.url, redis_server.url, "0.000001")
        process.send_signal(signal.SIGHUP)
        for _ in range(100):  # the main process reloads, then tells each worker
            await asyncio.sleep(0.05)
            if set(await _calls(url, 4)) == {429}:
                break
        assert await _calls(url, 6) == [429] * 6
    finally:
        await _stop(process)
    (record,) = [
        r for r in map(orjson.loads, records.read_bytes().splitlines()) if r["request_id"] == request_id
    ]
    assert Decimal(cost) == Decimal(str(record["total_cost"])) == Decimal("0.00472")
