"""Both budget stores against the same rules: atomic reservations, idempotent settlement, expiry.

The Redis store runs against a real redis-server on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from llmtally.budgets.rules import BudgetKey, CallFacts, keys_for, period_bounds, to_nano
from llmtally.budgets.store import BudgetStore, MemoryStore, RedisStore
from llmtally.config import BudgetRule
from llmtally.testing.redis_server import RedisServer

NOW = datetime.now(UTC)  # the memory store expires holds by the clock, as Redis reads it
NOW_MS = int(NOW.timestamp() * 1000)
TTL_MS = 900_000
FACTS = CallFacts("openai", "direct", "gpt-4o", "chat.completions", {"tenant": "acme"})


def keys(*rules: BudgetRule) -> list[BudgetKey]:
    return keys_for(list(rules), FACTS, NOW)


def rule(name: str = "r", limit: str = "1", action: str = "block") -> BudgetRule:
    return BudgetRule(name, {"tag": "tenant"}, Decimal(limit), "month", action)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore(server.url, 2.0)
    yield redis_store
    await redis_store.close()


async def spent_reserved(store: BudgetStore) -> dict[str, tuple[int, int]]:
    return {s.rule: (s.spent, s.reserved) for s in await store.states()}


async def test_reserve_within_the_limit_then_refuse_past_it(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    assert (await store.reserve("a", k, to_nano(Decimal("0.6")), NOW_MS, TTL_MS)).refused is None
    refused = await store.reserve("b", k, to_nano(Decimal("0.6")), NOW_MS, TTL_MS)
    assert refused.refused == 0 and refused.reserved == 600_000_000 and refused.spent == 0
    assert await spent_reserved(store) == {"r": (0, 600_000_000)}


async def test_settle_replaces_the_reservation_by_the_cost_once(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    await store.reserve("a", k, 600_000_000, NOW_MS, TTL_MS)
    assert await store.settle("a", k, 123) is True
    assert await store.settle("a", k, 123) is False  # a replay changes nothing
    assert await spent_reserved(store) == {"r": (123, 0)}
    # the room it freed is there for the next call
    assert (await store.reserve("b", k, 900_000_000, NOW_MS, TTL_MS)).refused is None


async def test_a_reservation_after_its_settlement_is_ignored(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    await store.settle("a", k, 5)  # unchecked call (store was down when it started), settled
    late = await store.reserve("a", k, 500, NOW_MS, TTL_MS)  # its delayed reservation arrives
    assert late.settled and late.refused is None
    assert await spent_reserved(store) == {"r": (5, 0)}


async def test_a_reservation_never_settled_expires(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    await store.reserve("crashed", k, 900_000_000, NOW_MS, 1000)
    assert (await store.reserve("b", k, 900_000_000, NOW_MS + 10, TTL_MS)).refused == 0
    assert (await store.reserve("c", k, 900_000_000, NOW_MS + 1001, TTL_MS)).refused is None
    assert await spent_reserved(store) == {"r": (0, 900_000_000)}


async def test_a_call_is_reserved_on_all_its_keys_or_none(store: BudgetStore) -> None:
    big, small = rule("big", "10"), rule("small", "1")
    k = keys(big, small)
    assert (await store.reserve("a", k, 800_000_000, NOW_MS, TTL_MS)).refused is None
    assert (await store.reserve("b", k, 800_000_000, NOW_MS, TTL_MS)).refused == 1  # "small" refuses
    assert await spent_reserved(store) == {"big": (0, 800_000_000), "small": (0, 800_000_000)}


async def test_a_warn_rule_never_refuses_and_says_when_it_is_over(store: BudgetStore) -> None:
    k = keys(rule("w", "1", "warn"))
    assert (await store.reserve("a", k, 700_000_000, NOW_MS, TTL_MS)).warned == ()
    assert (await store.reserve("b", k, 700_000_000, NOW_MS, TTL_MS)).warned == (0,)


async def test_an_exhausted_budget_refuses_a_call_it_cannot_price(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    await store.settle("a", k, 1_000_000_000)  # exactly at the limit
    assert (await store.reserve("b", k, 0, NOW_MS, TTL_MS)).refused == 0


async def test_concurrent_reservations_never_pass_the_limit(store: BudgetStore) -> None:
    k = keys(rule(limit="1"))
    results = await asyncio.gather(
        *(store.reserve(f"c{i}", k, 30_000_000, NOW_MS, TTL_MS) for i in range(200))
    )
    admitted = [r for r in results if r.refused is None]
    assert len(admitted) == 33  # 33 × $0.03 ≤ $1 < 34 × $0.03
    assert await spent_reserved(store) == {"r": (0, 33 * 30_000_000)}


async def test_redis_keys_expire_a_day_after_their_period(redis_server: RedisServer) -> None:
    import redis.asyncio as redis

    store = RedisStore(redis_server.url, 2.0)
    (k,) = keys(rule(limit="1"))
    await store.reserve("a", [k], 5, NOW_MS, TTL_MS)
    client = redis.Redis.from_url(redis_server.url)
    start, end = period_bounds("month", NOW)
    assert end is not None
    expected_ttl = int(end.timestamp()) + 86400 - datetime.now(UTC).timestamp()
    assert abs(await client.ttl(k.key) - expected_ttl) <= 2  # TTL: EXPIRETIME needs Redis 7
    assert k.key == f"{{llmtally}}:budget:r:{start:%Y-%m}:tenant=acme"
    await client.aclose()
    await store.close()
