"""Where budgets are counted: this process's memory, or Redis shared by a fleet.

Both stores keep, per budget key, ``spent`` and ``reserved`` in integer nano-dollars, and the
reservation of each call by its request id, so that:

- **reserve** is atomic over every key a call counts against: all or nothing, refused when a
  blocking key's ``spent + reserved + amount`` would pass its limit;
- **settle** is idempotent by request id (a marker key): it releases exactly what that call reserved
  and adds its cost; a second settle of the same call changes nothing, and a reservation that arrives
  after its call was settled (a delayed retry) is ignored;
- a reservation never settled (its proxy died) expires after ``reservation_ttl_s``;
- keys expire a day after their period ends; nothing is ever re-seeded from elsewhere, so a restarted
  proxy cannot inflate a counter.

Redis runs two Lua scripts (one round trip each); every value written is an integer string (Lua's
doubles are used only to compare, exact below 2**53 nano-dollars).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmtally.budgets.rules import KEY_PREFIX, BudgetKey

#: How long a settled call's marker is kept: its settlement is idempotent for this long.
SETTLED_TTL_S = 2 * 86400
#: Keys outlive their period by this much, so /budgets still shows a period that just ended.
AFTER_PERIOD_S = 86400
SETTLED_PREFIX = "{llmtally}:settled:"
#: Connections one process keeps to Redis at most.
MAX_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation's outcome: ``refused`` is the index of the key that refused it (None: reserved);
    ``warned``: indices of warn-only keys now past their limit; ``settled``: the call was settled
    already (a late retry), nothing reserved."""

    refused: int | None = None
    warned: tuple[int, ...] = ()
    settled: bool = False
    spent: int = 0
    reserved: int = 0
    #: Reserved: the least any key has left after this reservation (nano-dollars).
    remaining: int | None = None


#: (request id, its budget keys, its cost in nano-dollars)
Settlement = tuple[str, Sequence[BudgetKey], int]


@dataclass(slots=True)
class KeyState:
    key: str
    rule: str
    value: str
    period_end: str
    limit: int
    spent: int = 0
    reserved: int = 0


class BudgetStore(Protocol):
    name: str

    async def reserve(
        self, request_id: str, keys: Sequence[BudgetKey], amount: int, now_ms: int, ttl_ms: int
    ) -> Reserved: ...

    async def settle(self, request_id: str, keys: Sequence[BudgetKey], cost: int) -> bool:
        """True when applied now, False when this call was settled before."""
        ...

    async def settle_many(self, calls: Sequence[Settlement]) -> None:
        """Settle each (request id, keys, cost), in one round trip where the store can; raises when
        the store fails (then none, some or all were applied: settling again is harmless)."""
        ...

    async def states(self) -> list[KeyState]: ...

    async def close(self) -> None: ...


def _expire_at(key: BudgetKey) -> int:
    """Unix seconds the key may be dropped at (0: never, a ``total`` budget)."""
    return int(key.period_end.timestamp()) + AFTER_PERIOD_S if key.period_end is not None else 0


def _meta(key: BudgetKey) -> tuple[str, str, str, str]:
    end = key.period_end.strftime("%Y-%m-%dT%H:%M:%SZ") if key.period_end is not None else ""
    return key.rule.name, key.value, end, str(key.limit_nano)


@dataclass(slots=True)
class _MemoryKey:
    state: KeyState
    expire_at: int
    #: request id → (amount, deadline ms)
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)


class MemoryStore:
    """One process's budgets (``store = "memory"``): the same rules as Redis, no network."""

    name = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, _MemoryKey] = {}
        self._settled: dict[str, float] = {}

    def _entry(self, key: BudgetKey) -> _MemoryKey:
        entry = self._keys.get(key.key)
        rule, value, end, limit = _meta(key)
        if entry is None:
            entry = self._keys[key.key] = _MemoryKey(KeyState(key.key, rule, value, end, int(limit)), 0)
        entry.state.limit = int(limit)  # the rule's limit now (hot reload)
        entry.expire_at = _expire_at(key)
        return entry

    def _purge(self, entry: _MemoryKey, now_ms: int) -> None:
        for request_id, (amount, deadline) in list(entry.holds.items()):
            if deadline <= now_ms:
                del entry.holds[request_id]
                entry.state.reserved -= amount

    async def reserve(
        self, request_id: str, keys: Sequence[BudgetKey], amount: int, now_ms: int, ttl_ms: int
    ) -> Reserved:
        self._forget_old(now_ms)
        if request_id in self._settled:
            return Reserved(settled=True)
        entries = [self._entry(k) for k in keys]
        for entry in entries:
            self._purge(entry, now_ms)
        for i, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            state = entry.state
            if key.blocks and state.spent + state.reserved + max(amount, 1) > state.limit:
                return Reserved(refused=i, spent=state.spent, reserved=state.reserved)
        warned = []
        remaining: int | None = None
        for i, (key, entry) in enumerate(zip(keys, entries, strict=True)):
            state = entry.state
            state.reserved += amount
            entry.holds[request_id] = (amount, now_ms + ttl_ms)
            left = state.limit - state.spent - state.reserved
            remaining = left if remaining is None else min(remaining, left)
            if not key.blocks and left < 0:
                warned.append(i)
        return Reserved(warned=tuple(warned), remaining=remaining)

    async def settle(self, request_id: str, keys: Sequence[BudgetKey], cost: int) -> bool:
        if request_id in self._settled:
            return False
        self._settled[request_id] = time.time() + SETTLED_TTL_S
        for key in keys:
            entry = self._entry(key)
            hold = entry.holds.pop(request_id, None)
            if hold is not None:
                entry.state.reserved -= hold[0]
            entry.state.spent += cost
        return True

    async def settle_many(self, calls: Sequence[Settlement]) -> None:
        for request_id, keys, cost in calls:
            await self.settle(request_id, keys, cost)

    def _forget_old(self, now_ms: int) -> None:
        now = now_ms / 1000
        if len(self._settled) > 4096 and next(iter(self._settled.values())) < now:
            self._settled = {rid: until for rid, until in self._settled.items() if until >= now}
        for name in [n for n, e in self._keys.items() if e.expire_at and e.expire_at < now]:
            del self._keys[name]

    async def states(self) -> list[KeyState]:
        self._forget_old(int(time.time() * 1000))
        now_ms = int(time.time() * 1000)
        for entry in self._keys.values():
            self._purge(entry, now_ms)
        return [entry.state for entry in self._keys.values()]

    async def close(self) -> None:
        return None


# KEYS[1]: the call's settled marker; KEYS[2..]: its budget keys.
# ARGV: request id, amount, now ms, deadline ms, then per key: limit, blocks (1/0), expire-at s,
# rule, value, period end.
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {-2, 0, 0} end
local rid, amount = ARGV[1], ARGV[2]
local need = math.max(tonumber(amount), 1)
for i = 2, #KEYS do
  local k = KEYS[i]
  local expired = redis.call('ZRANGEBYSCORE', k .. '|x', '-inf', ARGV[3], 'LIMIT', 0, 64)
  for _, m in ipairs(expired) do
    local held = redis.call('HGET', k .. '|r', m)
    if held then redis.call('HINCRBY', k, 'reserved', '-' .. held) end
    redis.call('HDEL', k .. '|r', m)
    redis.call('ZREM', k .. '|x', m)
  end
end
for i = 2, #KEYS do
  local o = 5 + (i - 2) * 6
  if ARGV[o + 1] == '1' then
    local spent = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
    local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
    if spent + reserved + need > tonumber(ARGV[o]) then
      local h = KEYS[i]
      return {i - 1, redis.call('HGET', h, 'spent') or '0', redis.call('HGET', h, 'reserved') or '0'}
    end
  end
end
local out = {0, 0, 0}
local least = nil
for i = 2, #KEYS do
  local k, o = KEYS[i], 5 + (i - 2) * 6
  redis.call('HINCRBY', k, 'reserved', amount)
  redis.call('HSET', k, 'limit', ARGV[o], 'rule', ARGV[o + 3], 'value', ARGV[o + 4],
    'period_end', ARGV[o + 5])
  redis.call('HSET', k .. '|r', rid, amount)
  redis.call('ZADD', k .. '|x', ARGV[4], rid)
  if ARGV[o + 2] ~= '0' then
    redis.call('EXPIREAT', k, ARGV[o + 2])
    redis.call('EXPIREAT', k .. '|r', ARGV[o + 2])
    redis.call('EXPIREAT', k .. '|x', ARGV[o + 2])
  end
  local left = tonumber(ARGV[o]) - tonumber(redis.call('HGET', k, 'spent') or '0')
    - tonumber(redis.call('HGET', k, 'reserved') or '0')
  if least == nil or left < least then least = left end
  if ARGV[o + 1] == '0' and left < 0 then table.insert(out, i - 1) end
end
out[2] = least  -- an integer below 2**53: exact as a double, returned as an integer reply
return out
"""

# KEYS[1]: the call's settled marker; KEYS[2..]: its budget keys.
# ARGV: request id, cost, marker ttl s, then per key: limit, expire-at s, rule, value, period end.
_SETTLE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
local rid, cost = ARGV[1], ARGV[2]
for i = 2, #KEYS do
  local k, o = KEYS[i], 4 + (i - 2) * 5
  local held = redis.call('HGET', k .. '|r', rid)
  if held then
    redis.call('HINCRBY', k, 'reserved', '-' .. held)
    redis.call('HDEL', k .. '|r', rid)
    redis.call('ZREM', k .. '|x', rid)
  end
  redis.call('HINCRBY', k, 'spent', cost)
  redis.call('HSET', k, 'limit', ARGV[o], 'rule', ARGV[o + 2], 'value', ARGV[o + 3],
    'period_end', ARGV[o + 4])
  if ARGV[o + 1] ~= '0' then redis.call('EXPIREAT', k, ARGV[o + 1]) end
end
return 1
"""


class RedisStore:
    """Budgets shared by every proxy that uses the same Redis (or Valkey): ``store = "redis://…"``."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis.asyncio as redis  # the budgets extra: only a proxy with a Redis store needs it

        self.url = url
        # A bounded pool that makes a burst of checks wait for a connection (up to the timeout)
        # instead of failing: each check holds one only for its round trip.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._client: Any = redis.Redis(connection_pool=pool)
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._timeout_s = timeout_s
        self._lean: Any = None
        self._settle_sha = ""

    async def reserve(
        self, request_id: str, keys: Sequence[BudgetKey], amount: int, now_ms: int, ttl_ms: int
    ) -> Reserved:
        names, argv = reserve_args(request_id, keys, amount, now_ms, ttl_ms)
        return reserved_of(await self._reserve(keys=names, args=argv))

    async def settle(self, request_id: str, keys: Sequence[BudgetKey], cost: int) -> bool:
        return bool(await self._settle(*_settle_args(request_id, keys, cost)))

    async def settle_many(self, calls: Sequence[Settlement]) -> None:
        # The record process settles every call of the pod: on the lean pipelined connection
        # (llmtally.budgets.wire), one write and one round trip for the batch. redis-py's pipeline
        # cost ~100 µs of this process's CPU per call in batches of a few (load_tests/budget_cost.py).
        from llmtally.budgets.wire import LeanRedis

        if self._lean is None:
            # Nobody waits on a settlement: a busy Redis or machine gets time, not a dropped connection.
            self._lean = LeanRedis(self.url, settle_timeout_s(self._timeout_s))
            self._settle_sha = self._lean.script(_SETTLE)
        lean = self._lean
        if not lean.connected:
            await lean.connect()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        left = [len(calls)]
        failures: list[Exception] = []

        def answer(reply: Any) -> None:
            if isinstance(reply, Exception):
                failures.append(reply)
            left[0] -= 1
            if not left[0] and not done.done():
                done.set_result(None)

        for call in calls:
            names, argv = _settle_args(*call)
            lean.evalsha(self._settle_sha, names, argv, answer)
        await done
        if failures:
            raise failures[0]

    async def states(self) -> list[KeyState]:
        out: list[KeyState] = []
        async for name in self._client.scan_iter(match=KEY_PREFIX + "*", count=1000):
            key = name.decode() if isinstance(name, bytes) else name
            if key.endswith(("|r", "|x")):
                continue
            fields = await self._client.hgetall(key)
            text = {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in fields.items()
            }
            if "limit" not in text:
                continue
            out.append(
                KeyState(
                    key, text.get("rule", ""), text.get("value", ""), text.get("period_end", ""),
                    int(text["limit"]), int(text.get("spent", 0)), int(text.get("reserved", 0)),
                )
            )  # fmt: skip
        return out

    async def close(self) -> None:
        if self._lean is not None:
            self._lean.close()
        await self._client.aclose()


def reserve_args(
    request_id: str, keys: Sequence[BudgetKey], amount: int, now_ms: int, ttl_ms: int
) -> tuple[list[str], list[str | int]]:
    """The reserve script's KEYS and ARGV."""
    argv: list[str | int] = [request_id, amount, now_ms, now_ms + ttl_ms]
    for key in keys:
        rule, value, end, limit = _meta(key)
        argv += [limit, "1" if key.blocks else "0", _expire_at(key), rule, value, end]
    return [SETTLED_PREFIX + request_id, *(k.key for k in keys)], argv


def reserved_of(out: Sequence[Any]) -> Reserved:
    """The reserve script's reply."""
    status = int(out[0])
    if status == -2:
        return Reserved(settled=True)
    if status > 0:
        return Reserved(refused=status - 1, spent=int(out[1]), reserved=int(out[2]))
    return Reserved(warned=tuple(int(i) - 1 for i in out[3:]), remaining=int(out[1]))


#: The scripts, for clients that load them themselves (llmtally.budgets.wire).
RESERVE_SCRIPT = _RESERVE
SETTLE_SCRIPT = _SETTLE


def _settle_args(request_id: str, keys: Sequence[BudgetKey], cost: int) -> tuple[list[str], list[str | int]]:
    argv: list[str | int] = [request_id, cost, SETTLED_TTL_S]
    for key in keys:
        rule, value, end, limit = _meta(key)
        argv += [limit, _expire_at(key), rule, value, end]
    return [SETTLED_PREFIX + request_id, *(k.key for k in keys)], argv


def settle_timeout_s(store_timeout_s: float) -> float:
    """How long a batch of settlements may take: no call waits on it, so far longer than a check."""
    return max(4 * store_timeout_s, 5.0)


def open_store(url: str, timeout_s: float) -> BudgetStore:
    return MemoryStore() if url == "memory" else RedisStore(url, timeout_s)


async def wait_for(coro: Any, timeout_s: float) -> Any:
    """``coro`` within ``timeout_s`` (TimeoutError after)."""
    return await asyncio.wait_for(coro, timeout_s)
