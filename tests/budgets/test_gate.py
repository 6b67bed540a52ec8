"""Budgets in the main process: settlements that wait for the store survive a stop, and apply once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from llmtally.budgets import Budgets
from llmtally.config import BudgetRule, BudgetsConfig, Config
from llmtally.pricing import PriceBook
from llmtally.record import Cost, TokenUsage, UsageRecord
from llmtally.testing.redis_server import RedisServer


def record(request_id: str, cost: str) -> UsageRecord:
    return UsageRecord(
        timestamp="t", request_id=request_id, provider="openai", endpoint="chat.completions",
        request_model="gpt-4o", model="gpt-4o", stream=False, status=200, usage=TokenUsage(1, 1),
        usage_source="provider", cost=Cost(Decimal(cost), Decimal(0)), price_source="p", latency_ms=1.0,
        ttfb_ms=None, tags={"tenant": "acme"},
    )  # fmt: skip


async def spent(budgets: Budgets) -> str:
    report = await budgets.report()
    return str(report["budgets"][0]["spent_usd"]) if report["budgets"] else "none"


async def test_settlements_waiting_at_a_stop_are_saved_and_applied_at_the_next_start(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    rule = BudgetRule("t", {"tag": "tenant"}, Decimal("10"))
    config = BudgetsConfig(store=redis_server.url, store_timeout_s=0.2, rules=[rule])
    book = PriceBook(Config().pricing)
    pending = tmp_path / "budget-settlements-8787.jsonl"
    first = Budgets(config, lambda: book)
    first.start(pending)
    redis_server.kill()
    when = datetime.now(UTC)
    for i in range(3):
        first.settle_record(record(f"r{i}", "0.25"), when)
    await asyncio.sleep(0.3)
    await first.close(within_s=0.5)
    assert len(pending.read_bytes().splitlines()) == 3 and first.stats.settled == 0

    redis_server.start()
    second = Budgets(config, lambda: book)
    second.start(pending)  # read back, the file removed
    assert not pending.exists()
    for _ in range(100):
        if second.stats.settled == 3:
            break
        await asyncio.sleep(0.05)
    second.settle_record(record("r0", "0.25"), when)  # a replay of one of them: counted once
    await asyncio.sleep(0.2)
    assert await spent(second) == "0.75"
    await second.close()
