"""The budget gate: every metered call asks it before going upstream; every record settles with it.

:class:`Budgets` decides (rules, a cost bound, the store) and settles; it lives where records are
built (the main process under ``llmtally serve``: one per pod, whatever the worker count). A proxy
worker reaches it through a :class:`RemoteGate` on a Unix socket (a lean framed protocol: one
``send`` per check, no HTTP), a single-process proxy through a :class:`LocalGate`.

The bound reserved per call (docs/budgets.md): the input counted locally (or the body's byte length,
which no tokenizer's count exceeds, when the counter is not loaded or the body is large) at the
input price, plus the request's output maximum (``max_tokens`` …, else ``default_output_tokens``) at
the output price.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import orjson

from llmtally.budgets.rules import BudgetKey, CallFacts, from_nano, keys_for, to_nano
from llmtally.budgets.store import BudgetStore, KeyState, open_store
from llmtally.config import BudgetRule, BudgetsConfig
from llmtally.providers.base import Endpoint, MeteredRequest
from llmtally.record import TokenUsage

if TYPE_CHECKING:
    from llmtally.counters import TokenCounter
    from llmtally.pricing import PriceBook
    from llmtally.record import Provider, UsageRecord

log = logging.getLogger("llmtally.budgets")

#: The error a refused call's record carries.
REFUSED = "budget_exceeded"
#: Bodies past this are bounded by their byte length, not counted (a count would hold the gate's loop).
COUNT_AT_MOST_BYTES = 256 * 1024
#: Store errors are logged at most this often.
LOG_EVERY_S = 60.0
#: Settlements waiting for the store are kept up to this many (past it: the oldest are logged lost).
MAX_PENDING = 200_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """What the proxy knows of a call before it goes upstream (small: it crosses a socket)."""

    request_id: str
    provider: Provider
    platform: str
    model: str | None
    endpoint: Endpoint
    tags: dict[str, str]
    started_us: int
    body: bytes
    stream: bool
    #: The request's own output maximum (``ProviderAdapter.max_output_tokens``).
    max_output: int | None
    service_tier: str | None = None
    inference_geo: str | None = None

    @property
    def started_at(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.started_us)


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


GO = Admission()


def store_down(config: BudgetsConfig, reason: str) -> Admission:
    if config.on_store_error == "block":
        return Admission(
            "unavailable", message=f"llmtally cannot check spend limits ({reason}): call not forwarded"
        )
    return Admission(unchecked=True)


@dataclass(slots=True)
class BudgetStats:
    refused: collections.Counter[str]
    warned: collections.Counter[str]
    unchecked: int = 0
    store_errors: int = 0
    settled: int = 0
    settle_retries: int = 0
    settlements_lost: int = 0


class Budgets:
    """Rules, the store, the bound and the settlement queue of one meter."""

    def __init__(
        self,
        config: BudgetsConfig,
        prices: Callable[[], PriceBook],
        counters: dict[Provider, TokenCounter],
    ) -> None:
        self.config = config
        self.rules: list[BudgetRule] = list(config.rules)
        self.store: BudgetStore = open_store(config.store, config.store_timeout_s)
        self._prices = prices
        self._counters = counters
        self.stats = BudgetStats(collections.Counter(), collections.Counter())
        self.store_ok = True
        self._logged_at = 0.0
        #: (request id, facts, started at, cost in nano-dollars), oldest first.
        self._pending: collections.deque[tuple[str, CallFacts, datetime, int]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_file: Path | None = None

    # Life ----------------------------------------------------------------------------------------

    def start(self, pending_file: Path | None = None) -> None:
        """On the loop that settles (the meter's); settlements a previous run saved in
        ``pending_file`` are queued first, and those left at :meth:`close` are saved there."""
        self._pending_file = pending_file
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._load_pending()
        self._drain = self._loop.create_task(self._drain_pending(), name="llmtally-budget-settle")

    async def close(self, within_s: float = 5.0) -> None:
        """Settle what is queued (up to ``within_s``), save the rest for the next start."""
        deadline = time.monotonic() + within_s
        while self._pending and self.store_ok and time.monotonic() < deadline:
            if self._wake is not None:
                self._wake.set()
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

    # Check ---------------------------------------------------------------------------------------

    async def check(self, ask: BudgetAsk) -> Admission:
        when = ask.started_at
        keys = keys_for(self.rules, CallFacts(ask.provider, ask.platform, ask.model, ask.endpoint.name,
                                              ask.tags), when)  # fmt: skip
        if not keys:
            return GO
        amount = self.bound(ask)
        now_ms = int(time.time() * 1000)
        reserving = self.store.reserve(
            ask.request_id, keys, amount, now_ms, int(self.config.reservation_ttl_s * 1000)
        )
        try:
            if self.store.name == "memory":  # answers at once: no timer, no task (LocalGate relies on it)
                reserved = await reserving
            else:
                reserved = await asyncio.wait_for(reserving, self.config.store_timeout_s)
        except Exception as exc:  # the store is down or slow: the call is not held up by it
            self._store_failed("check", exc)
            admission = store_down(self.config, f"{self.store.name} store: {type(exc).__name__}")
            if admission.unchecked:
                self.stats.unchecked += 1
            return admission
        self._store_back()
        if reserved.refused is not None:
            key = keys[reserved.refused]
            self.stats.refused[key.rule.name] += 1
            return Admission(
                "refuse", (key.rule.name,), refusal_message(key, amount, reserved.spent, reserved.reserved),
                key.seconds_left(datetime.now(UTC)),
            )  # fmt: skip
        warned = tuple(keys[i].rule.name for i in reserved.warned)
        for name in warned:
            self.stats.warned[name] += 1
        return Admission(rules=warned) if warned else GO

    def bound(self, ask: BudgetAsk) -> int:
        """The most this call can cost, as far as its request tells, in nano-dollars."""
        model = ask.model or ""
        counter = self._counters.get(ask.provider)
        tokens = len(ask.body)  # no tokenizer makes more tokens than bytes
        if counter is not None and len(ask.body) <= COUNT_AT_MOST_BYTES and counter.ready(model):
            try:
                payload = orjson.loads(ask.body) if ask.body else {}
                if isinstance(payload, dict):
                    tokens = counter.count_request(model, ask.endpoint.name, payload).input_tokens
            except Exception:  # an unparseable body is forwarded as is; bounded by its length
                pass
        output = ask.max_output if ask.max_output is not None else self.config.default_output_tokens
        from llmtally.platforms import price_data_provider

        quote = self._prices().quote(
            ask.provider, model, TokenUsage(input_tokens=tokens, output_tokens=output), ask.started_at,
            None, ask.service_tier, ask.inference_geo, price_data_provider(ask.platform, ask.provider),  # type: ignore[arg-type]
        )  # fmt: skip
        return to_nano(quote.cost.total_cost) if quote.cost is not None else 0

    # Settle --------------------------------------------------------------------------------------

    def settle_record(self, record: UsageRecord, started_at: datetime) -> None:
        """Queue a built record's settlement (thread-safe: records are built off the loop)."""
        if record.status == 429 and record.error == REFUSED:
            return  # refused before anything was reserved
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
        try:
            loop.call_soon_threadsafe(self._queue, item)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._pending.append(item)

    def _queue(self, item: tuple[str, CallFacts, datetime, int]) -> None:
        if len(self._pending) >= MAX_PENDING:
            lost = self._pending.popleft()
            self.stats.settlements_lost += 1
            log.error("budget settlement of %s lost: %d waiting for the store", lost[0], MAX_PENDING)
        self._pending.append(item)
        if self._wake is not None:
            self._wake.set()

    async def _drain_pending(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [self._pending[i] for i in range(min(64, len(self._pending)))]
                results = await asyncio.gather(*(self._settle(item) for item in batch))
                done = 0
                for ok in results:  # in order: what failed stays queued, first
                    if not ok:
                        break
                    done += 1
                for _ in range(done):
                    self._pending.popleft()
                if done < len(batch):
                    self.stats.settle_retries += 1
                    await asyncio.sleep(1.0)  # the store is down: try again in a second

    async def _settle(self, item: tuple[str, CallFacts, datetime, int]) -> bool:
        request_id, facts, started_at, cost = item
        keys = keys_for(self.rules, facts, started_at)
        if not keys:
            return True
        try:
            await asyncio.wait_for(self.store.settle(request_id, keys, cost), self.config.store_timeout_s * 4)
        except Exception as exc:
            self._store_failed("settle", exc)
            return False
        self._store_back()
        self.stats.settled += 1
        return True

    # Outages -------------------------------------------------------------------------------------

    def _store_failed(self, what: str, exc: BaseException) -> None:
        self.stats.store_errors += 1
        was_ok, self.store_ok = self.store_ok, False
        now = time.monotonic()
        if was_ok or now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.error(
                "budget store %s failed (%s: %s): calls %s; %d settlements queued",
                what, type(exc).__name__, exc,
                "forwarded unchecked" if self.config.on_store_error == "allow" else "refused with 503",
                len(self._pending),
            )  # fmt: skip

    def _store_back(self) -> None:
        if not self.store_ok:
            self.store_ok = True
            log.warning("budget store is back; %d settlements queued", len(self._pending))
            if self._wake is not None:
                self._wake.set()

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
            self._store_failed("read", exc)
            states = None
        return {
            "store": self.store.name,
            "store_ok": self.store_ok,
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
            "refused_calls": dict(self.stats.refused),
            "warned_calls": dict(self.stats.warned),
            "unchecked_calls": self.stats.unchecked,
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


def ask_for(request_id: str, provider: Provider, platform: str, request: MeteredRequest,
            tags: dict[str, str], started_at: datetime, max_output: int | None) -> BudgetAsk:  # fmt: skip
    return BudgetAsk(
        request_id, provider, platform, request.model, request.endpoint, tags,
        (started_at - _EPOCH) // timedelta(microseconds=1), request.body, request.stream, max_output,
        request.service_tier, request.inference_geo,
    )  # fmt: skip


# Reaching the gate ------------------------------------------------------------------------------


class LocalGate:
    """The gate in this process (single-process proxy, the test harness)."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets

    def check(self, ask: BudgetAsk) -> Admission | asyncio.Future[Admission]:
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


_FRAME = struct.Struct(">IQ")  # payload length, call id


class _GateServerProtocol(asyncio.Protocol):
    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= _FRAME.size:
            length, call = _FRAME.unpack_from(buffer)
            end = _FRAME.size + length
            if len(buffer) < end:
                break
            ask = pickle.loads(buffer[_FRAME.size : end])  # a worker of this same meter: trusted
            del buffer[:end]
            task = asyncio.ensure_future(self._answer(call, ask))
            del task

    async def _answer(self, call: int, ask: BudgetAsk) -> None:
        try:
            admission = await self.budgets.check(ask)
        except Exception as exc:  # a bug must not leave a worker's call waiting
            log.exception("budget check failed")
            admission = store_down(self.budgets.config, f"check failed: {type(exc).__name__}")
        if self.transport is not None and not self.transport.is_closing():
            data = pickle.dumps(admission, protocol=pickle.HIGHEST_PROTOCOL)
            self.transport.write(_FRAME.pack(len(data), call) + data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class GateServer:
    """The main process's end of the workers' gate socket."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _GateServerProtocol(self.budgets), path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _GateClientProtocol(asyncio.Protocol):
    def __init__(self, gate: RemoteGate) -> None:
        self.gate = gate
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= _FRAME.size:
            length, call = _FRAME.unpack_from(buffer)
            end = _FRAME.size + length
            if len(buffer) < end:
                break
            admission = pickle.loads(buffer[_FRAME.size : end])
            del buffer[:end]
            self.gate.answered(call, admission)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.lost()


class RemoteGate:
    """A proxy worker's end: checks travel to the main process's :class:`Budgets`."""

    def __init__(self, config: BudgetsConfig) -> None:
        self.config = config
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, tuple[asyncio.Future[Admission], asyncio.TimerHandle]] = {}
        self._ids = 0
        #: How long a check may take, gate hop included, before the call counts as a store error.
        self._timeout_s = config.store_timeout_s + 1.0

    @classmethod
    async def connect(cls, path: str, config: BudgetsConfig) -> RemoteGate:
        gate = cls(config)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: _GateClientProtocol(gate), path)
        gate._transport = transport  # uvloop's transports are not asyncio.Transport subclasses
        return gate

    def check(self, ask: BudgetAsk) -> Admission | asyncio.Future[Admission]:
        transport = self._transport
        if transport is None or transport.is_closing():
            return store_down(self.config, "the record process is not reachable")
        loop = asyncio.get_running_loop()
        self._ids += 1
        call = self._ids
        future: asyncio.Future[Admission] = loop.create_future()
        timer = loop.call_later(self._timeout_s, self._expire, call)
        self._waiting[call] = (future, timer)
        data = pickle.dumps(ask, protocol=pickle.HIGHEST_PROTOCOL)
        transport.write(_FRAME.pack(len(data), call) + data)
        return future

    def answered(self, call: int, admission: Admission) -> None:
        waiting = self._waiting.pop(call, None)
        if waiting is None:
            return  # it timed out already
        future, timer = waiting
        timer.cancel()
        if not future.done():
            future.set_result(admission)

    def _expire(self, call: int) -> None:
        waiting = self._waiting.pop(call, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(store_down(self.config, "the budget check timed out"))

    def lost(self) -> None:
        self._transport = None
        for future, timer in self._waiting.values():
            timer.cancel()
            if not future.done():
                future.set_result(store_down(self.config, "the record process is not reachable"))
        self._waiting.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


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
            self.budgets._store_failed("read", exc)
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
            ("refused", stats.refused, "Calls refused by a spend limit."),
            ("warned", stats.warned, "Calls forwarded past a warn-only spend limit."),
        ):
            family = CounterMetricFamily(f"llmtally_budget_{name}", what, labels=["rule"])
            for rule, count in counts.items():
                family.add_metric([rule], count)
            yield family
        unchecked = "Calls forwarded unchecked: the store was down."
        yield CounterMetricFamily("llmtally_budget_unchecked", unchecked, value=stats.unchecked)
        yield CounterMetricFamily(
            "llmtally_budget_store_errors", "Budget store operations that failed.", value=stats.store_errors
        )
        yield GaugeMetricFamily(
            "llmtally_budget_settlements_pending",
            "Settlements waiting for the store.",
            value=len(self.budgets._pending),
        )
