"""Prometheus metrics of the budgets (``/metrics``): the store's counters as last read, this pod's counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from llmtally.budgets.gate import Budgets
from llmtally.budgets.store import KeyState

#: /metrics reads the budgets from the store at most this often (a scrape never waits for it: it
#: shows what the read started by the scrape before found).
METRICS_REFRESH_S = 1.0


class BudgetCollector:
    """Prometheus metrics of the budgets: the store's counters as last read, and this pod's counts."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._states: list[KeyState] = []
        self._read_at = -METRICS_REFRESH_S
        self._reading: asyncio.Task[None] | None = None

    def _refresh(self) -> None:
        loop = self.budgets._loop
        now = time.monotonic()
        if loop is None or self._reading is not None or now - self._read_at < METRICS_REFRESH_S:
            return
        self._read_at = now

        def start() -> None:
            self._reading = loop.create_task(self._read())

        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is stopping
            loop.call_soon_threadsafe(start)

    async def _read(self) -> None:
        try:
            self._states = await asyncio.wait_for(self.budgets.store.states(), 5.0)
        except Exception as exc:
            self.budgets.health.failed("read", exc)
        finally:
            self._reading = None

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._refresh()
        gauges = {
            name: GaugeMetricFamily(f"llmtally_budget_{name}_usd", what, labels=["rule", "key"])
            for name, what in (
                ("spent", "Spend settled on a budget in its current period (USD)."),
                ("reserved", "Spend reserved by calls in flight (USD)."),
                ("limit", "A budget's limit (USD)."),
            )
        }
        for s in self._states:
            for name, nano in (("spent", s.spent), ("reserved", s.reserved), ("limit", s.limit)):
                gauges[name].add_metric([s.rule, s.value], nano / 1e9)  # a gauge's value is a float
        yield from gauges.values()
        stats = self.budgets.stats
        for name, counts, what in (
            ("refused", stats.refused_calls, "Calls refused by a spend limit."),
            ("warned", stats.warned_calls, "Calls forwarded past a warn-only spend limit."),
        ):
            family = CounterMetricFamily(f"llmtally_budget_{name}", what, labels=["rule"])
            for rule, count in counts.items():
                family.add_metric([rule], count)
            yield family
        unchecked = "Calls forwarded unchecked: the store was down."
        yield CounterMetricFamily("llmtally_budget_unchecked", unchecked, value=stats.unchecked_calls)
        yield CounterMetricFamily(
            "llmtally_budget_store_errors", "Budget store operations that failed.", value=stats.store_errors
        )
        yield GaugeMetricFamily(
            "llmtally_budget_settlements_pending",
            "Settlements waiting for the store.",
            value=len(self.budgets._pending),
        )
