"""The proxy worker's lean Redis connection (llmtally.budgets.wire) against a real redis-server:
pipelined replies in order, a restarted Redis without its scripts, a stalled one, a lost one, AUTH."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from llmtally.budgets.wire import LeanRedis, RedisUnavailable
from llmtally.testing.redis_server import RedisServer

ECHO = "return {KEYS[1], ARGV[1]}"


def call(client: LeanRedis, sha: str, key: str, arg: str | int) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client.evalsha(sha, [key], [arg], lambda reply: future.done() or future.set_result(reply))
    return future


async def test_replies_match_their_commands_in_order(redis_server: RedisServer) -> None:
    client = LeanRedis(redis_server.url, 2.0)
    sha = client.script(ECHO)
    await client.connect()
    replies = await asyncio.gather(*(call(client, sha, f"k{i}", i) for i in range(500)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(500)]
    client.close()


async def test_a_redis_restarted_without_its_scripts_is_answered_with_eval(redis_server: RedisServer) -> None:
    client = LeanRedis(redis_server.url, 2.0)
    sha = client.script(ECHO)
    await client.connect()
    flush = call(client, sha, "x", 1)
    await flush
    import redis.asyncio as redis

    admin = redis.Redis.from_url(redis_server.url)
    await admin.script_flush()
    assert await call(client, sha, "a", 1) == [b"a", b"1"]  # NOSCRIPT → EVAL, in order
    assert await call(client, sha, "b", 2) == [b"b", b"2"]
    assert await admin.script_exists(sha) == [True]  # loaded again
    await admin.aclose()
    client.close()


async def test_a_stalled_redis_fails_the_pending_commands_after_the_timeout(
    redis_server: RedisServer,
) -> None:
    client = LeanRedis(redis_server.url, 0.2)
    sha = client.script(ECHO)
    await client.connect()
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        reply = await asyncio.wait_for(call(client, sha, "a", 1), 2)
        assert isinstance(reply, TimeoutError)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    # Between reconnect attempts (at most one every 0.25 s) a command fails at once ...
    assert isinstance(await call(client, sha, "b", 2), RedisUnavailable)
    await asyncio.sleep(0.3)
    # ... and the next one starts an attempt and waits for it, in order with those after it.
    assert await asyncio.gather(call(client, sha, "c", 3), call(client, sha, "d", 4)) == [
        [b"c", b"3"], [b"d", b"4"],
    ]  # fmt: skip
    client.close()


async def test_a_lost_connection_fails_fast_and_comes_back(redis_server: RedisServer) -> None:
    client = LeanRedis(redis_server.url, 1.0)
    sha = client.script(ECHO)
    await client.connect()
    redis_server.kill()
    lost = await asyncio.wait_for(call(client, sha, "a", 1), 2)
    assert isinstance(lost, RedisUnavailable)
    with pytest.raises(RedisUnavailable):
        await LeanRedis(redis_server.url, 0.5).connect()
    await asyncio.sleep(0.3)
    assert isinstance(await call(client, sha, "b", 2), RedisUnavailable)  # an attempt, refused
    redis_server.start()
    await asyncio.sleep(0.3)
    assert await call(client, sha, "c", 3) == [b"c", b"3"]  # the next attempt connects
    client.close()


async def test_auth_and_select_from_the_url() -> None:
    server = RedisServer()
    server.extra_args = ["--requirepass", "s3cret"]
    server.start()
    try:
        client = LeanRedis(f"redis://:s3cret@127.0.0.1:{server.port}/2", 1.0)
        sha = client.script("return redis.call('SET', KEYS[1], ARGV[1])")
        await client.connect()
        assert await call(client, sha, "k", "v") == b"OK"
        import redis.asyncio as redis

        admin = redis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        assert await admin.get("k") == b"v"
        await admin.aclose()
        client.close()
        with pytest.raises(RedisUnavailable):
            await LeanRedis(f"redis://:wrong@127.0.0.1:{server.port}/0", 1.0).connect()
    finally:
        server.stop()
