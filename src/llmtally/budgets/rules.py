"""Spend-limit rules: which budgets a call counts against, their periods, money as integer nano-dollars.

Pure functions only: the store (:mod:`llmtally.budgets.store`) keeps the counters, the gate
(:mod:`llmtally.budgets.gate`) decides. A call matches a rule when every filter of its ``match`` holds;
it then counts against one budget *key* per rule: the rule, the period the call started in, and the
values its grouping fields took (``tag = "tenant"``: one budget per tenant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from urllib.parse import quote, urlparse

from llmtally.config import BudgetRule, BudgetsConfig, ConfigError

#: Money in the store: integer nano-dollars (1e-9 USD), exact, and within the 2**53 a Redis script
#: compares exactly up to $9,007,199.
NANO = Decimal("1e-9")
MAX_LIMIT_USD = Decimal("9000000")
#: The fields a rule may match on (besides ``tag`` and ``tag.<name>``).
FIELDS = ("provider", "platform", "model", "endpoint")
#: Every store key starts with this: one Redis Cluster hash slot, so one script can touch them all.
KEY_PREFIX = "{llmtally}:budget:"


def to_nano(usd: Decimal) -> int:
    """USD → nano-dollars, rounded up: a counter never reads less than the costs it holds."""
    return int((usd / NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(nano: int) -> Decimal:
    return (Decimal(nano) * NANO).normalize() if nano else Decimal(0)


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What a rule can match on, as the proxy knows it before the call goes upstream (and as the
    call's record says it afterwards: the same facts give the same keys)."""

    provider: str
    platform: str
    model: str | None
    endpoint: str
    tags: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class BudgetKey:
    """One budget: a rule, a period, the values the call grouped by."""

    rule: BudgetRule
    #: The grouping values, ``tenant=acme`` style, "" when the rule groups by nothing.
    value: str
    period_start: datetime
    #: None for ``period = "total"``.
    period_end: datetime | None
    #: The store's key.
    key: str

    @property
    def limit_nano(self) -> int:
        return to_nano(self.rule.limit_usd)

    @property
    def blocks(self) -> bool:
        return self.rule.action == "block"

    def seconds_left(self, now: datetime) -> int | None:
        if self.period_end is None:
            return None
        return max(1, math.ceil((self.period_end - now).total_seconds()))


def period_bounds(period: str, when: datetime) -> tuple[datetime, datetime | None]:
    """The UTC calendar period ``when`` falls in: [start, end)."""
    when = when.astimezone(UTC)
    if period == "day":
        start = when.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
    if period == "month":
        start = when.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return start, start.replace(year=year, month=month)
    return datetime(1970, 1, 1, tzinfo=UTC), None


def _period_label(period: str, start: datetime) -> str:
    if period == "day":
        return start.strftime("%Y-%m-%d")
    if period == "month":
        return start.strftime("%Y-%m")
    return "total"


def keys_for(rules: list[BudgetRule], facts: CallFacts, when: datetime) -> list[BudgetKey]:
    """The budgets a call counts against (in rule order)."""
    keys: list[BudgetKey] = []
    for rule in rules:
        parts = _grouping(rule, facts)
        if parts is None:
            continue
        start, end = period_bounds(rule.period, when)
        value = ",".join(parts)
        key = (
            f"{KEY_PREFIX}{quote(rule.name, safe='')}:{_period_label(rule.period, start)}:"
            f"{quote(value, safe='=,')}"
        )
        keys.append(BudgetKey(rule, value, start, end, key))
    return keys


def _grouping(rule: BudgetRule, facts: CallFacts) -> list[str] | None:
    """The rule's grouping values for this call, or None when it does not match."""
    parts: list[str] = []
    for name, wanted in rule.match.items():
        if name == "tag":
            got = facts.tags.get(wanted)
            if got is None:
                return None
            parts.append(f"{wanted}={got}")
            continue
        if name.startswith("tag."):
            if facts.tags.get(name[4:]) != wanted:
                return None
            continue
        got = getattr(facts, name) or ""
        if wanted == "*":
            parts.append(f"{name}={got}")
        elif got != wanted:
            return None
    return parts


def check_budgets(budgets: BudgetsConfig, source: str) -> None:
    """Refuse what the generic config loader cannot see: a bad store URL, rule names, match keys, limits."""
    where = f"{source}: [budgets]"
    if budgets.store != "memory":
        url = urlparse(budgets.store)
        if url.scheme not in ("redis", "rediss", "unix") or (url.scheme != "unix" and not url.hostname):
            raise ConfigError(
                f'{where} store: use "memory" or a Redis URL (redis://host:6379/0, rediss://…, '
                f"unix:///path), got {budgets.store!r}"
            )
    seen: set[str] = set()
    for i, rule in enumerate(budgets.rules):
        at = f"{source}: [[budgets.rules]] #{i + 1} ({rule.name!r})"
        if not rule.name or rule.name in seen:
            raise ConfigError(f"{at} name: must be unique and not empty")
        seen.add(rule.name)
        for name in rule.match:
            if name not in FIELDS and name != "tag" and not (name.startswith("tag.") and len(name) > 4):
                raise ConfigError(
                    f'{at} match: unknown key {name!r} (use {", ".join(FIELDS)}, tag or "tag.<name>")'
                )
        if not Decimal(0) < rule.limit_usd <= MAX_LIMIT_USD:
            raise ConfigError(f"{at} limit_usd: must be more than 0 and at most {MAX_LIMIT_USD}")
    if budgets.store_timeout_s <= 0:
        raise ConfigError(f"{where} store_timeout_s: must be more than 0")
