"""The gate socket between the main process (where :class:`~llmtally.budgets.gate.Budgets` lives)
and the proxy workers, and the workers' two gates.

A lean framed protocol on a Unix socket (a 12-byte head: payload length and call id, then a pickle;
both ends are this meter's own processes in a 0700 directory): one ``send`` per message, no HTTP.

- :class:`RemoteGate` (memory store): every check is answered by the main process, which holds the
  counters all of the pod's workers share.
- :class:`DirectGate` (Redis store): the worker reserves in Redis itself, one round trip per call;
  the main process hands it the unit prices of each route and model (once each) and the rules (again
  whenever they are reloaded), and hears of its refusals and outages for ``/budgets`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
import time
from functools import partial
from typing import Any, cast

from llmtally.budgets.gate import (
    GO,
    Admission,
    BudgetAsk,
    Budgets,
    LocalGate,
    Pending,
    PriceKey,
    StoreHealth,
    UnitPrice,
    Waiting,
    admit,
    bound_of,
    store_down,
)
from llmtally.budgets.rules import BudgetKey, keys_for
from llmtally.budgets.store import RESERVE_SCRIPT, reserve_args, reserved_of
from llmtally.budgets.wire import LeanRedis
from llmtally.config import BudgetRule, BudgetsConfig

log = logging.getLogger("llmtally.budgets")

_FRAME = struct.Struct(">IQ")  # payload length, call id
#: The call id of a message nobody answers (a count, a broadcast).
_TOLD = 0
#: What a question to the main process gives when no answer came in time.
_NO_ANSWER = object()


def _frame(call: int, message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data), call) + data


class _Framed(asyncio.Protocol):
    """Splits the byte stream into (call id, message)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _FRAME.size:
            length, call = _FRAME.unpack_from(buffer)
            end = _FRAME.size + length
            if len(buffer) < end:
                break
            message = pickle.loads(buffer[_FRAME.size : end])  # this meter's own processes: trusted
            del buffer[:end]
            self.received(call, message)

    def received(self, call: int, message: Any) -> None:
        raise NotImplementedError

    def send(self, call: int, message: object) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_frame(call, message))


class _GateServerProtocol(_Framed):
    def __init__(self, server: GateServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.peers.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.peers.discard(self)
        self.transport = None

    def received(self, call: int, message: Any) -> None:
        budgets = self.server.budgets
        kind = message[0]
        if kind == "check":
            answer = self.server.local.check(message[1])  # the memory store answers at once
            if isinstance(answer, Admission):
                self.send(call, answer)
                return
            answer.add_done_callback(partial(self._answered, call))
        elif kind == "price":
            self.send(call, budgets.unit_price(message[1]))
        elif kind == "count":
            budgets.count(message[1], message[2])

    def _answered(self, call: int, answer: asyncio.Future[Admission]) -> None:
        try:
            admission = answer.result()
        except Exception as exc:  # a bug must not leave a worker's call waiting
            log.error("budget check failed", exc_info=exc)
            admission = store_down(self.server.budgets.config, f"check failed: {type(exc).__name__}")
        self.send(call, admission)


class GateServer:
    """The main process's end of the workers' gate socket."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.local = LocalGate(budgets)
        self.peers: set[_GateServerProtocol] = set()
        self._server: asyncio.AbstractServer | None = None
        budgets.on_change.append(self._tell_peers)

    async def start(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _GateServerProtocol(self), path)

    def _tell_peers(self) -> None:
        """New rules or prices: every worker's gate takes the rules and forgets its prices."""
        for peer in list(self.peers):
            peer.send(_TOLD, ("changed", self.budgets.rules))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _GateClientProtocol(_Framed):
    def __init__(self, gate: RemoteGate) -> None:
        super().__init__()
        self.gate = gate

    def received(self, call: int, message: Any) -> None:
        if call == _TOLD:
            self.gate.told(message)
        else:
            self.gate.answered(call, message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.gate.lost()


class RemoteGate:
    """A proxy worker's gate whose checks the main process answers (the memory store)."""

    def __init__(self, config: BudgetsConfig) -> None:
        self.config = config
        self._peer: _GateClientProtocol | None = None
        self._waiting: dict[int, tuple[asyncio.Future[Any], asyncio.TimerHandle]] = {}
        self._ids = 0
        #: How long an answer may take, the hop to the main process included, before the call
        #: counts as a store error.
        self._timeout_s = config.store_timeout_s + 1.0

    @classmethod
    async def connect(cls, path: str, config: BudgetsConfig) -> RemoteGate:
        gate = cls(config)
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_unix_connection(lambda: _GateClientProtocol(gate), path)
        gate._peer = peer
        return gate

    @property
    def connected(self) -> bool:
        return self._peer is not None and self._peer.transport is not None

    def ask(self, message: tuple[Any, ...], on_timeout: Any) -> asyncio.Future[Any]:
        """Send ``message``; its answer, or ``on_timeout`` if none comes in time."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._peer is None:
            future.set_result(on_timeout)
            return future
        self._ids += 1
        call = self._ids
        timer = loop.call_later(self._timeout_s, self._expire, call, on_timeout)
        self._waiting[call] = (future, timer)
        self._peer.send(call, message)
        return future

    def tell(self, message: tuple[Any, ...]) -> None:
        if self._peer is not None:
            self._peer.send(_TOLD, message)

    def check(self, ask: BudgetAsk) -> Admission | Waiting:
        if not self.connected:
            return store_down(self.config, "the record process is not reachable")
        return self.ask(("check", ask), store_down(self.config, "the budget check timed out"))

    def answered(self, call: int, answer: Any) -> None:
        waiting = self._waiting.pop(call, None)
        if waiting is None:
            return  # it timed out already
        future, timer = waiting
        timer.cancel()
        if not future.done():
            future.set_result(answer)

    def told(self, message: Any) -> None:
        pass

    def _expire(self, call: int, on_timeout: Any) -> None:
        waiting = self._waiting.pop(call, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(on_timeout)

    def lost(self) -> None:
        self._peer = None
        for future, timer in self._waiting.values():
            timer.cancel()
            if not future.done():
                future.set_result(store_down(self.config, "the record process is not reachable"))
        self._waiting.clear()

    def close(self) -> None:
        if self._peer is not None and self._peer.transport is not None:
            self._peer.transport.close()


class DirectGate(RemoteGate):
    """A proxy worker's gate that reserves in Redis itself: one round trip per call, answered from
    the read callback that brings Redis's reply (llmtally.budgets.wire)."""

    def __init__(self, config: BudgetsConfig) -> None:
        super().__init__(config)
        self.redis = LeanRedis(config.store, config.store_timeout_s)
        self._reserve_sha = self.redis.script(RESERVE_SCRIPT)
        self.rules: list[BudgetRule] = list(config.rules)
        self._prices: dict[PriceKey, UnitPrice | None] = {}
        self._pricing: dict[PriceKey, asyncio.Future[Any]] = {}
        self.events = _ToldEvents(self)
        self.health = StoreHealth(config, self.events, lambda: 0)

    @classmethod
    async def connect(cls, path: str, config: BudgetsConfig) -> DirectGate:
        gate = cast(DirectGate, await super().connect(path, config))
        try:
            await gate.redis.connect()
        except ConnectionError as exc:  # calls go on as on_store_error says; it reconnects
            gate.health.failed("connect", exc)
        return gate

    def check(self, ask: BudgetAsk) -> Admission | Waiting:
        key = ask.price_key
        if key not in self._prices:  # once per route and model (and after a reload)
            return asyncio.ensure_future(self._check_priced(ask))
        return self._reserve(ask, self._prices[key])

    async def _check_priced(self, ask: BudgetAsk) -> Admission:
        key = ask.price_key
        pricing = self._pricing.get(key)
        if pricing is None:
            pricing = self._pricing[key] = self.ask(("price", key), _NO_ANSWER)
        price = await pricing
        self._pricing.pop(key, None)
        if price is _NO_ANSWER:  # the main process did not answer in time: as a store error, asked again
            admission = store_down(self.config, "no price from the record process")
            if admission.unchecked:
                self.events.unchecked()
            return admission
        self._prices[key] = price
        answer = self._reserve(ask, price)
        if isinstance(answer, Admission):
            return answer
        done: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()

        def answered(pending: Pending) -> None:
            if not done.done():
                done.set_result(pending.result())

        answer.add_done_callback(answered)
        return await done

    def _reserve(self, ask: BudgetAsk, price: UnitPrice | None) -> Admission | Pending:
        keys = keys_for(self.rules, ask.facts, ask.started_at)
        if not keys:
            return GO
        amount = bound_of(ask, price, self.config)
        now_ms = int(time.time() * 1000)
        names, argv = reserve_args(
            ask.request_id, keys, amount, now_ms, int(self.config.reservation_ttl_s * 1000)
        )
        pending = Pending()
        self.redis.evalsha(self._reserve_sha, names, argv, partial(self._reserved, pending, keys, amount))
        return pending.result() if pending.done() else pending

    def _reserved(self, future: Pending, keys: list[BudgetKey], amount: int, reply: Any) -> None:
        if future.done():
            return
        try:
            if isinstance(reply, Exception):
                raise reply
            reserved = reserved_of(reply)
        except Exception as exc:  # the store is down, slow, or answered something else
            self.health.failed("check", exc)
            admission = store_down(self.config, f"redis store: {type(exc).__name__}")
            if admission.unchecked:
                self.events.unchecked()
            future.set_result(admission)
            return
        self.health.back()
        future.set_result(admit(reserved, keys, amount, self.events))

    def told(self, message: Any) -> None:
        if message[0] == "changed":
            self.rules = list(message[1])
            self._prices.clear()

    def close(self) -> None:
        super().close()
        self.redis.close()


class _ToldEvents:
    """A worker's counts go to the main process, where /budgets and /metrics read them."""

    def __init__(self, gate: DirectGate) -> None:
        self.gate = gate

    def refused(self, rule: str) -> None:
        self.gate.tell(("count", "refused", rule))

    def warned(self, rule: str) -> None:
        self.gate.tell(("count", "warned", rule))

    def unchecked(self) -> None:
        self.gate.tell(("count", "unchecked", ""))

    def store_error(self) -> None:
        self.gate.tell(("count", "store_error", ""))
