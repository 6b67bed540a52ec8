"""The fleet: three separate ``llmtally serve`` processes share one budget in one real Redis.

300 concurrent calls (streamed and not, some cut by their client) against a $1 budget, Redis killed
with SIGKILL a third of the way in and restarted later. Afterwards the counter holds exactly the sum
of every record's cost, nothing is left reserved, settled spend is within the documented bound, and
every refused call got a 429 in its provider's own error shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis

from llmtally.budgets.rules import to_nano
from llmtally.testing import FakeUpstream, FakeUpstreamConfig
from llmtally.testing.redis_server import RedisServer

CALLS = 300
LIMIT = Decimal("1.00")
#: The dearest call here (Claude Sonnet 4.5 at the fake's usage): what one unchecked call can add.
DEAREST = Decimal("0.017775")
MESSAGES = [{"role": "user", "content": "Say hello"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_file(path: Path) -> Any:
    return open(path, "wb")  # handed to the process, closed once it has it


async def _serve(config: Path, index: int, tmp: Path) -> tuple[asyncio.subprocess.Process, str, str, Path]:
    records = tmp / f"records-{index}.jsonl"
    stderr = _log_file(tmp / f"stderr-{index}.log")
    admin = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", "0",
        stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        env={**os.environ, "LLMTALLY_LOGGING_DESTINATION": str(records),
             "LLMTALLY_SERVER_ADMIN_PORT": str(admin)},
    )  # fmt: skip
    stderr.close()
    for _ in range(600):
        text = (tmp / f"stderr-{index}.log").read_text(errors="replace")
        found = re.search(r"listening on (http://\S+)", text)
        if found:
            return process, found.group(1), f"http://127.0.0.1:{admin}", records
        assert process.returncode is None, text
        await asyncio.sleep(0.05)
    raise AssertionError("llmtally serve did not start")


def _request(kind: int) -> tuple[str, dict[str, Any], dict[str, str], str]:
    """(path, body, headers, provider) for the kind-th sort of call."""
    tag = {"x-llmtally-tag-tenant": "acme"}
    if kind == 0:
        return "/openai/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1000}, \
            {"Authorization": "Bearer k", **tag}, "openai"  # fmt: skip
    if kind == 1:
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1000, "stream": True}
        return "/openai/v1/chat/completions", body, {"Authorization": "Bearer k", **tag}, "openai"
    if kind == 2:
        body = {"model": "claude-sonnet-4-5", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
        return "/anthropic/v1/messages", body, {"x-api-key": "k", "anthropic-version": "2023-06-01", **tag}, \
            "anthropic"  # fmt: skip
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 1000}}
    return "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body, \
        {"x-goog-api-key": "k", **tag}, "gemini"  # fmt: skip


def _provider_shaped(provider: str, body: dict[str, Any]) -> bool:
    if provider == "openai":
        return body["error"]["type"] == "rate_limit_exceeded" and "per-tenant" in body["error"]["message"]
    if provider == "anthropic":
        return body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    return body["error"]["status"] == "RESOURCE_EXHAUSTED" and body["error"]["code"] == 429


async def test_three_proxies_share_one_budget_through_a_redis_outage(tmp_path: Path) -> None:
    redis_server = RedisServer(persistent=True)
    redis_server.start()
    upstream = FakeUpstream(FakeUpstreamConfig(chunks=4, chunk_interval_s=0.005))
    url = await upstream.start()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[upstreams]\nopenai = "{url}"\nanthropic = "{url}"\ngemini = "{url}"\n'
        f'[budgets]\nstore = "{redis_server.url}"\nstore_timeout_s = 0.3\n'
        '[[budgets.rules]]\nname = "per-tenant"\nmatch = { tag = "tenant" }\n'
        f'limit_usd = "{LIMIT}"\nperiod = "month"\naction = "block"\n'
    )
    proxies = [await _serve(config, i, tmp_path) for i in range(3)]
    outcomes: list[tuple[int, str, bool]] = []  # status, provider, provider-shaped refusal
    done = 0
    rng = random.Random(7)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            gate = asyncio.Semaphore(30)

            async def call(i: int) -> None:
                nonlocal done
                path, body, headers, provider = _request(i % 4)
                cut = i % 4 != 0 and rng.random() < 0.15
                base = proxies[i % 3][1]
                async with gate, session.post(base + path, json=body, headers=headers) as response:
                    if cut and response.status == 200:
                        await response.content.readany()  # the client leaves mid-stream
                        response.close()
                        outcomes.append((200, provider, False))
                    else:
                        data = await response.read()
                        shaped = response.status == 429 and _provider_shaped(provider, orjson.loads(data))
                        outcomes.append((response.status, provider, shaped))
                done += 1
                if done == 100:
                    redis_server.kill()  # an outage: calls keep flowing (on_store_error = "allow")
                if done == 150:
                    redis_server.start()

            await asyncio.gather(*(call(i) for i in range(CALLS)))
        reports = []
        async with aiohttp.ClientSession() as session:
            for _, _, admin, _ in proxies:
                for _ in range(200):  # until every settlement queued during the outage is applied
                    async with session.get(admin + "/budgets") as got:
                        report = await got.json()
                    if report["settlements_pending"] == 0 and report["store_ok"]:
                        break
                    await asyncio.sleep(0.1)
                reports.append(report)
        for process, *_ in proxies:
            process.send_signal(signal.SIGTERM)
        for process, *_ in proxies:
            assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        for process, *_ in proxies:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await upstream.stop()

    records = [orjson.loads(line) for _, _, _, path in proxies for line in path.read_bytes().splitlines()]
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in client.scan_iter(match="{llmtally}:budget:*") if not k.endswith((b"|r", b"|x"))]
        assert len(keys) == 1, keys
        spent, reserved = (int(v or 0) for v in await client.hmget(keys[0], ["spent", "reserved"]))
    finally:
        await client.aclose()
        redis_server.stop()

    assert len(outcomes) == CALLS and len(records) == CALLS  # one record per call, none lost
    refused = [o for o in outcomes if o[0] == 429]
    assert refused and all(shaped for _, _, shaped in refused), refused[:3]
    assert sum(1 for r in records if r["error"] == "budget_exceeded") == len(refused)
    assert {o[0] for o in outcomes} <= {200, 429}
    costs = [Decimal(str(r["total_cost"])) for r in records if r["total_cost"] is not None]
    # The counter equals the records, exactly (each cost rounded up to the nano-dollar, as it is kept).
    assert spent == sum(to_nano(c) for c in costs if c > 0)
    assert reserved == 0
    unchecked = sum(r["unchecked_calls"] for r in reports)
    assert unchecked > 0  # the outage happened while calls were flowing
    # The bound: every reservation here is a true bound, so only the calls forwarded unchecked while
    # the store was down can take spend past the limit.
    assert Decimal(spent) / 10**9 <= LIMIT + unchecked * DEAREST
    print(json.dumps({"records": len(records), "refused": len(refused), "unchecked": unchecked,
                      "spent_usd": str(Decimal(spent) / 10**9)}))  # fmt: skip
