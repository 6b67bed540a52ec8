"""The budget gate: every metered call asks it before going upstream; every record settles with it.

:class:`Budgets` lives where records are built (the main process under ``llmtally serve``: one per
pod, whatever the worker count): it holds the rules, prices each call's bound and settles every
record with the store. A call is checked

- with a Redis store, by the proxy worker itself (:class:`~llmtally.budgets.remote.DirectGate`):
  one round trip to Redis per call, with the rules and unit prices the main process hands it;
- with the memory store, by the main process (:class:`~llmtally.budgets.remote.RemoteGate`), which
  holds the counters all of the pod's workers share;
- in a single-process proxy, in that process (:class:`LocalGate`).

The bound reserved per call (docs/budgets.md): the request body's length in bytes as its input
tokens (no tokenizer makes more tokens than bytes) at the input price, plus the request's output
maximum (``max_tokens`` …, else ``default_output_tokens``) at the output price; prices as for 1M
tokens of each, so a long-context tier is never under-priced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from llmtally.budgets.rules import BudgetKey, CallFacts, from_nano, keys_for, to_nano
from llmtally.budgets.store import BudgetStore, KeyState, Reserved, open_store, settle_timeout_s
from llmtally.config import BudgetRule, BudgetsConfig
from llmtally.providers.base import MeteredRequest
from llmtally.record import TokenUsage

if TYPE_CHECKING:
    from llmtally.pricing import PriceBook
    from llmtally.record import Provider, UsageRecord

log = logging.getLogger("llmtally.budgets")

#: The error a refused call's record carries.
REFUSED = "budget_exceeded"


def refused(status: int | None, error: str | None) -> bool:
    """A call a spend limit refused before anything went upstream (its exchange's or record's
    status and error): nothing reserved, nothing to settle, cost 0."""
    return status == 429 and error == REFUSED


#: Store errors are logged at most this often.
LOG_EVERY_S = 60.0
#: Settlements sent to the store together (one round trip), after waiting this long for company.
SETTLE_BATCH = 256
SETTLE_AFTER_S = 0.01
#: Settlements waiting for the store are kept up to this many (past it: the oldest are logged lost).
MAX_PENDING = 200_000
MILLION = Decimal(1_000_000)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """What the proxy knows of a call before it goes upstream (small: it may cross a socket)."""

    request_id: str
    provider: Provider
    platform: str
    model: str | None
    endpoint: str
    tags: dict[str, str]
    started_us: int
    #: The request body's length: the bound of its input tokens.
    input_bytes: int
    #: The request's own output maximum (``ProviderAdapter.max_output_tokens``).
    max_output: int | None
    service_tier: str | None = None
    inference_geo: str | None = None

    @property
    def started_at(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.started_us)

    @property
    def facts(self) -> CallFacts:
        return CallFacts(self.provider, self.platform, self.model, self.endpoint, self.tags)

    @property
    def price_key(self) -> PriceKey:
        return (self.provider, self.platform, self.model, self.service_tier, self.inference_geo)


#: What a call's unit prices depend on: dialect, route, model, service tier, region.
PriceKey = tuple[str, str, str | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """USD per 1M input and output tokens, as the price book quotes 1M of each (the top tier)."""

    input: Decimal
    output: Decimal

    def bound(self, input_tokens: int, output_tokens: int) -> int:
        """Nano-dollars, rounded up."""
        return to_nano((self.input * input_tokens + self.output * output_tokens) / MILLION)


@dataclass(frozen=True, slots=True)
class Admission:
    """The gate's answer: ``go`` (forward), ``refuse`` (429, a rule's limit), ``unavailable`` (503,
    the store is down and ``on_store_error = "block"``). ``rules``: the refusing rule, or the
    warn-only rules now past their limit."""

    verdict: Literal["go", "refuse", "unavailable"] = "go"
    rules: tuple[str, ...] = ()
    message: str = ""
    retry_after_s: int | None = None
    #: Forwarded without a check (the store was down, ``on_store_error = "allow"``).
    unchecked: bool = False
    #: The least any of the call's budgets has left, this call's reservation counted (USD text).
    remaining_usd: str | None = None


GO = Admission()


class Waiting(Protocol):
    """An admission still to come: what the proxy needs of it (an asyncio Future is one)."""

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...
    def cancelled(self) -> bool: ...
    def result(self) -> Admission: ...
    def cancel(self) -> bool: ...


class Pending:
    """A :class:`Waiting` whose callbacks run at once when it is answered, inside the read callback
    that brought the answer: no loop turn between Redis's reply and the call going upstream."""

    __slots__ = ("_callbacks", "_cancelled", "_result")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Any], object]] = []
        self._result: Admission | None = None
        self._cancelled = False

    def done(self) -> bool:
        return self._result is not None or self._cancelled

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        if self._result is not None:
            fn(self)
        elif not self._cancelled:
            self._callbacks.append(fn)

    def set_result(self, admission: Admission) -> None:
        if self.done():
            return
        self._result = admission
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # one call's bug must not stop the replies of the others
                log.exception("a budget admission callback failed")

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        self._callbacks = []
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def result(self) -> Admission:
        if self._result is None:
            raise asyncio.InvalidStateError("no admission yet")
        return self._result


def store_down(config: BudgetsConfig, reason: str) -> Admission:
    if config.on_store_error == "block":
        return Admission(
            "unavailable", message=f"llmtally cannot check spend limits ({reason}): call not forwarded"
        )
    return Admission(unchecked=True)


class BudgetEvents(Protocol):
    """What a check counts: kept by :class:`BudgetStats`, or told to the main process by a worker."""

    def refused(self, rule: str) -> None: ...
    def warned(self, rule: str) -> None: ...
    def unchecked(self) -> None: ...
    def store_error(self) -> None: ...


@dataclass(slots=True)
class BudgetStats:
    """This pod's counts since it started (its workers' included): /budgets and /metrics."""

    refused_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    warned_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    unchecked_calls: int = 0
    store_errors: int = 0
    settled: int = 0
    settle_retries: int = 0
    settlements_lost: int = 0

    def refused(self, rule: str) -> None:
        self.refused_calls[rule] += 1

    def warned(self, rule: str) -> None:
        self.warned_calls[rule] += 1

    def unchecked(self) -> None:
        self.unchecked_calls += 1

    def store_error(self) -> None:
        self.store_errors += 1


class StoreHealth:
    """Whether the store answered last time; failures logged at most once a minute."""

    def __init__(self, config: BudgetsConfig, events: BudgetEvents, queued: Callable[[], int]) -> None:
        self.config = config
        self.events = events
        self.ok = True
        self._queued = queued
        self._logged_at = 0.0
        self.on_back: Callable[[], None] | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        self.events.store_error()
        was_ok, self.ok = self.ok, False
        now = time.monotonic()
        if was_ok or now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.error(
                "budget store %s failed (%s: %s): calls %s; %d settlements queued",
                what, type(exc).__name__, exc,
                "forwarded unchecked" if self.config.on_store_error == "allow" else "refused with 503",
                self._queued(),
            )  # fmt: skip

    def back(self) -> None:
        if not self.ok:
            self.ok = True
            log.warning("budget store is back; %d settlements queued", self._queued())
            if self.on_back is not None:
                self.on_back()


async def check_call(
    store: BudgetStore,
    rules: list[BudgetRule],
    config: BudgetsConfig,
    ask: BudgetAsk,
    price: UnitPrice | None,
    events: BudgetEvents,
    health: StoreHealth,
) -> Admission:
    """Reserve the call's bound on every budget it counts against, or say which refuses it."""
    keys = keys_for(rules, ask.facts, ask.started_at)
    if not keys:
        return GO
    amount = bound_of(ask, price, config)
    now_ms = int(time.time() * 1000)
    try:
        # No timer task per call: the Redis client's socket and pool timeouts bound the wait
        # (store_timeout_s), and a memory store answers at once (LocalGate relies on it).
        reserved = await store.reserve(
            ask.request_id, keys, amount, now_ms, int(config.reservation_ttl_s * 1000)
        )
    except Exception as exc:  # the store is down or slow: the call is not held up by it
        health.failed("check", exc)
        admission = store_down(config, f"{store.name} store: {type(exc).__name__}")
        if admission.unchecked:
            events.unchecked()
        return admission
    health.back()
    return admit(reserved, keys, amount, events)


def admit(reserved: Reserved, keys: list[BudgetKey], amount: int, events: BudgetEvents) -> Admission:
    """The admission a reservation's outcome gives."""
    if reserved.refused is not None:
        key = keys[reserved.refused]
        events.refused(key.rule.name)
        return Admission(
            "refuse", (key.rule.name,), refusal_message(key, amount, reserved.spent, reserved.reserved),
            key.seconds_left(datetime.now(UTC)),
        )  # fmt: skip
    warned = tuple(keys[i].rule.name for i in reserved.warned)
    for name in warned:
        events.warned(name)
    remaining = None if reserved.remaining is None else str(from_nano(max(0, reserved.remaining)))
    return Admission(rules=warned, remaining_usd=remaining)


def bound_of(ask: BudgetAsk, price: UnitPrice | None, config: BudgetsConfig) -> int:
    """The call's reservation in nano-dollars ($0 when unpriced, as its record will be)."""
    output = ask.max_output if ask.max_output is not None else config.default_output_tokens
    return price.bound(ask.input_bytes, output) if price is not None else 0


class Budgets:
    """Rules, the store, unit prices and the settlement queue of one meter."""

    def __init__(self, config: BudgetsConfig, prices: Callable[[], PriceBook]) -> None:
        self.config = config
        self.rules: list[BudgetRule] = list(config.rules)
        self.store: BudgetStore = open_store(config.store, config.store_timeout_s)
        self._prices = prices
        self._unit_prices: dict[PriceKey, UnitPrice | None] = {}
        self._priced_by: object = None
        self.stats = BudgetStats()
        #: (request id, facts, started at, cost in nano-dollars), oldest first.
        self._pending: collections.deque[tuple[str, CallFacts, datetime, int]] = collections.deque()
        self.health = StoreHealth(config, self.stats, lambda: len(self._pending))
        self.health.on_back = self._kick
        self._wake: asyncio.Event | None = None
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_file: Path | None = None
        #: Told of new rules or prices (the workers' gates, through the gate socket).
        self.on_change: list[Callable[[], None]] = []
        #: Settlements from the thread that builds records, not yet on the loop.
        self._incoming: list[tuple[str, CallFacts, datetime, int]] = []
        self._incoming_lock = threading.Lock()
        self._handing_over = False

    @property
    def store_ok(self) -> bool:
        return self.health.ok

    # Life ----------------------------------------------------------------------------------------

    def start(self, pending_file: Path | None = None) -> None:
        """On the loop that settles (the meter's); settlements a previous run saved in
        ``pending_file`` are queued first, and those left at :meth:`close` are saved there."""
        self._pending_file = pending_file
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._load_pending()
        self._drain = self._loop.create_task(self._drain_pending(), name="llmtally-budget-settle")
        self._kick()

    async def close(self, within_s: float = 5.0) -> None:
        """Settle what is queued (up to ``within_s``), save the rest for the next start."""
        self._take_incoming()
        deadline = time.monotonic() + within_s
        while self._pending and self.health.ok and time.monotonic() < deadline:
            self._kick()
            await asyncio.sleep(0.02)
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        self._save_pending()
        await self.store.close()

    def use_config(self, config: BudgetsConfig) -> None:
        """A reloaded config: new rules and limits now; a new store only after a restart."""
        if config.store != self.config.store:
            log.warning("[budgets] store changed: it takes effect after a restart")
        self.config = config
        self.rules = list(config.rules)
        self.health.config = config
        self._changed()

    def prices_changed(self) -> None:
        self._unit_prices.clear()
        self._changed()

    def _changed(self) -> None:
        for tell in self.on_change:
            tell()

    # Check ---------------------------------------------------------------------------------------

    async def check(self, ask: BudgetAsk) -> Admission:
        return await check_call(
            self.store, self.rules, self.config, ask, self.unit_price(ask.price_key), self.stats, self.health
        )

    def unit_price(self, key: PriceKey) -> UnitPrice | None:
        """What 1M input and 1M output tokens cost on this route, cached per price book."""
        book = self._prices()
        if book is not self._priced_by:
            self._unit_prices.clear()
            self._priced_by = book
        if key in self._unit_prices:
            return self._unit_prices[key]
        from llmtally.platforms import price_data_provider

        provider, platform, model, tier, geo = key
        quote = book.quote(
            provider, model, TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000),  # type: ignore[arg-type]
            datetime.now(UTC), None, tier, geo, price_data_provider(platform, provider),  # type: ignore[arg-type]
        )  # fmt: skip
        price = UnitPrice(quote.cost.input_cost, quote.cost.output_cost) if quote.cost is not None else None
        if len(self._unit_prices) > 4096:
            self._unit_prices.clear()
        self._unit_prices[key] = price
        return price

    def count(self, kind: str, rule: str) -> None:
        """An event a worker's own gate saw (``refused``, ``warned``, ``unchecked``, ``store_error``)."""
        if kind in ("refused", "warned"):
            getattr(self.stats, kind)(rule)
        elif kind in ("unchecked", "store_error"):
            getattr(self.stats, kind)()

    # Settle --------------------------------------------------------------------------------------

    def settle_record(self, record: UsageRecord, started_at: datetime) -> None:
        """Queue a built record's settlement (thread-safe: records are built off the loop)."""
        if refused(record.status, record.error):
            return  # nothing was reserved
        cost = record.cost.total_cost if record.cost is not None else None
        item = (
            record.request_id,
            CallFacts(record.provider, record.platform, record.request_model, record.endpoint, record.tags),
            started_at,
            to_nano(cost) if cost is not None and cost > 0 else 0,
        )
        loop = self._loop
        if loop is None:
            return
        with self._incoming_lock:
            self._incoming.append(item)
            if self._handing_over:
                return  # the loop takes it with the others already handed over
            self._handing_over = True
        try:
            # One wake-up of the loop per batch of records, not one per record (each is a write to
            # the loop's self-pipe and a turn of the loop).
            loop.call_soon_threadsafe(self._take_incoming)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._take_incoming()

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            items, self._incoming = self._incoming, []
            self._handing_over = False
        for item in items:
            if len(self._pending) >= MAX_PENDING:
                lost = self._pending.popleft()
                self.stats.settlements_lost += 1
                log.error("budget settlement of %s lost: %d waiting for the store", lost[0], MAX_PENDING)
            self._pending.append(item)
        self._kick()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _drain_pending(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            # Let the settlements of the next few milliseconds join: one round trip for all of them.
            await asyncio.sleep(SETTLE_AFTER_S)
            self._wake.clear()
            while self._pending:
                batch = [self._pending[i] for i in range(min(SETTLE_BATCH, len(self._pending)))]
                if not await self._settle(batch):
                    self.stats.settle_retries += 1
                    await asyncio.sleep(1.0)  # the store is down: try again in a second
                    continue
                for _ in batch:
                    self._pending.popleft()

    async def _settle(self, batch: list[tuple[str, CallFacts, datetime, int]]) -> bool:
        """Settle a batch, oldest first; False (all kept queued) when the store failed."""
        calls = []
        for request_id, facts, started_at, cost in batch:
            keys = keys_for(self.rules, facts, started_at)
            if keys:
                calls.append((request_id, keys, cost))
        if not calls:
            return True
        try:
            await asyncio.wait_for(
                self.store.settle_many(calls), settle_timeout_s(self.config.store_timeout_s)
            )
        except Exception as exc:  # settling again later is harmless: idempotent by request id
            self.health.failed("settle", exc)
            return False
        self.health.back()
        self.stats.settled += len(calls)
        return True

    # Saved settlements ---------------------------------------------------------------------------

    def _save_pending(self) -> None:
        if not self._pending or self._pending_file is None:
            return
        try:
            with open(self._pending_file, "ab") as fh:
                for rid, f, when, cost in self._pending:
                    fh.write(orjson.dumps([rid, f.provider, f.platform, f.model, f.endpoint, dict(f.tags),
                                           when.isoformat(), cost]) + b"\n")  # fmt: skip
            log.warning("%d budget settlements saved to %s for the next start", len(self._pending),
                        self._pending_file)  # fmt: skip
        except OSError as exc:
            self.stats.settlements_lost += len(self._pending)
            log.error("%d budget settlements lost: %s", len(self._pending), exc)
        self._pending.clear()

    def _load_pending(self) -> None:
        path = self._pending_file
        if path is None or not path.exists():
            return
        try:
            lines = path.read_bytes().splitlines()
            os.unlink(path)
        except OSError as exc:
            log.error("cannot read saved budget settlements %s: %s", path, exc)
            return
        for line in lines:
            try:
                rid, provider, platform, model, endpoint, tags, when, cost = orjson.loads(line)
                self._pending.append(
                    (rid, CallFacts(provider, platform, model, endpoint, tags), datetime.fromisoformat(when),
                     int(cost))
                )  # fmt: skip
            except (ValueError, TypeError):
                log.error("a saved budget settlement is unreadable: %r", line[:200])

    # Reading -------------------------------------------------------------------------------------

    async def report(self) -> dict[str, Any]:
        """``GET /budgets``: every key with spent, reserved, limit, remaining, period end (USD text)."""
        try:
            states: list[KeyState] | None = await asyncio.wait_for(self.store.states(), 5.0)
        except Exception as exc:
            self.health.failed("read", exc)
            states = None
        return {
            "store": self.store.name,
            "store_ok": self.health.ok,
            "on_store_error": self.config.on_store_error,
            "rules": [
                {
                    "name": r.name,
                    "match": r.match,
                    "limit_usd": str(r.limit_usd),
                    "period": r.period,
                    "action": r.action,
                }
                for r in self.rules
            ],
            "budgets": None
            if states is None
            else [
                {
                    "rule": s.rule,
                    "key": s.value,
                    "period_end": s.period_end or None,
                    "limit_usd": str(from_nano(s.limit)),
                    "spent_usd": str(from_nano(s.spent)),
                    "reserved_usd": str(from_nano(s.reserved)),
                    "remaining_usd": str(from_nano(max(0, s.limit - s.spent - s.reserved))),
                    "spent_nano_usd": s.spent,
                    "reserved_nano_usd": s.reserved,
                }
                for s in sorted(states, key=lambda s: (s.rule, s.value, s.period_end))
            ],
            "refused_calls": dict(self.stats.refused_calls),
            "warned_calls": dict(self.stats.warned_calls),
            "unchecked_calls": self.stats.unchecked_calls,
            "store_errors": self.stats.store_errors,
            "settlements_pending": len(self._pending),
            "settlements_lost": self.stats.settlements_lost,
        }


def refusal_message(key: BudgetKey, amount: int, spent: int, reserved: int) -> str:
    rule = key.rule
    scope = f" ({key.value})" if key.value else ""
    per = "in total" if rule.period == "total" else f"per {rule.period}"
    resets = (
        f"; it resets at {key.period_end.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        if key.period_end is not None
        else ""
    )
    return (
        f"llmtally spend limit {rule.name!r}{scope} reached: ${rule.limit_usd} {per}, "
        f"${from_nano(spent)} spent and ${from_nano(reserved)} reserved by calls in flight, "
        f"this call may cost up to ${from_nano(amount)}{resets}"
    )


def ask_for(
    request_id: str,
    provider: Provider,
    platform: str,
    request: MeteredRequest,
    tags: dict[str, str],
    started_at: datetime,
    max_output: int | None,
) -> BudgetAsk:
    return BudgetAsk(
        request_id, provider, platform, request.model, request.endpoint.name, tags,
        (started_at - _EPOCH) // timedelta(microseconds=1), len(request.body), max_output,
        request.service_tier, request.inference_geo,
    )  # fmt: skip


class LocalGate:
    """The gate in this process (single-process proxy, the test harness)."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def check(self, ask: BudgetAsk) -> Admission | Waiting:
        """The answer now when the store answers without waiting (memory), else a future."""
        coro = self.budgets.check(ask)
        if self.budgets.store.name != "memory":
            return asyncio.ensure_future(coro)
        try:  # a memory store never waits: the coroutine is done in its first step
            coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        coro.close()  # pragma: no cover - a memory store that waited
        raise RuntimeError("the memory budget store waited")
