"""The proxy's transport: route, forward unchanged, stream back, hand an Exchange to the meter.

Forward first, meter second: nothing here can fail a call because metering failed. Body parsing
lives in :mod:`llmtally.providers`; counting and pricing run wherever the :class:`Meter` runs them
(another process under ``llmtally serve``; the record pipeline's thread when embedded).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, Protocol
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from llmtally.budgets.gate import REFUSED, Admission, Waiting, ask_for
from llmtally.config import Config
from llmtally.exchange import Exchange, Meter
from llmtally.platforms import Platform, Route, build_platforms
from llmtally.pricing.calls import quote_call
from llmtally.pricing.engine import PriceBook
from llmtally.providers import ADAPTERS, MeteredRequest, ProviderAdapter
from llmtally.providers.base import Refusal, read_usage
from llmtally.providers.batch import BatchDownload
from llmtally.providers.encoding import DECODABLE
from llmtally.providers.realtime import session_reader
from llmtally.proxy.aiohttp_guard import body_deadline_s, guard_client_connector
from llmtally.proxy.batch_copy import BatchCopy
from llmtally.proxy.eager import start_eagerly
from llmtally.proxy.egress import Egress, PassthroughConnectError, passthrough_request, upstream_ssl_context
from llmtally.proxy.metering_copy import MeteringCopy, StreamBudget
from llmtally.proxy.outbox import Outbox
from llmtally.proxy.upstream import (
    Origin,
    UpstreamConnection,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamReadTimeout,
    UpstreamResponse,
)

log = logging.getLogger("llmtally.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Request headers never forwarded upstream (the upstream client writes its own Host and length).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length"}
TAG_PREFIX = "x-llmtally-tag-"
OVERHEAD_HEADER = "x-llmtally-overhead-ms"
REQUEST_ID_HEADER = "x-llmtally-request-id"
COST_HEADER = "x-llmtally-cost"
REMAINING_HEADER = "x-llmtally-budget-remaining"


class Gate(Protocol):
    """The spend-limit check (llmtally.budgets): an answer now, or one to wait for."""

    def check(self, ask: Any) -> Admission | Waiting: ...


STATE_KEY: web.AppKey[ProxyState] = web.AppKey("llmtally_state")
#: Why the service is not ready to take calls ("draining", "starting: ..."), or None when it is.
NotReady = Callable[[], str | None]
HEALTH_KEY: web.AppKey[tuple[Meter, NotReady]] = web.AppKey("llmtally_health")

# Request ids: a random per-process prefix and a counter (32 hex digits, like a UUID) — unique without
# a urandom syscall on every request, which the profile showed at ~20 µs each.
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()


def _reseed_ids() -> None:
    """A forked worker must not repeat its parent's ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(10).hex()
    _ID_COUNTER = itertools.count()


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """A unique request id (32 hex digits)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


@dataclass(slots=True)
class ProxyState:
    config: Config
    meter: Meter
    #: Unmetered passthrough calls (any method, streamed bodies): aiohttp's general client.
    session: aiohttp.ClientSession | None = None
    #: Metered calls, the hot path: a lean keep-alive client (see :mod:`llmtally.proxy.upstream`).
    pool: UpstreamPool | None = None
    #: The egress proxies both clients go through (read from the environment at startup).
    egress: Egress = field(default_factory=Egress)
    #: Socket writes of the fast path and the pool, sent after each batch of the loop's callbacks.
    outbox: Outbox | None = None
    #: Loop time when the shutdown grace ends and the runner cancels what is still running (set at
    #: shutdown: the proxy is draining from then on).
    cut_at: float | None = None
    drains: set[asyncio.Task[None]] = field(default_factory=set)
    #: Route prefix → the platform that serves it (direct, Azure, Vertex, Bedrock).
    platforms: dict[str, Platform] = field(default_factory=dict)
    #: Each upstream's origin, made once (the pool keys its connections by origin).
    origins: dict[URL, Origin] = field(default_factory=dict)
    #: A metered call's path as the client sent it (with its provider prefix) → the upstream's.
    upstream_paths: dict[str, str] = field(default_factory=dict)
    #: Metered calls whose exchange is not yet with the meter; shutdown waits for none.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    #: Stream bytes this worker holds for the record process to parse (proxy.metering_copy).
    stream_budget: StreamBudget = field(init=False)
    #: Where each metered call asks its spend limits before going upstream (None: no [budgets] rules).
    gate: Gate | None = None
    #: The price book for ``x-llmtally-cost`` on non-streamed answers (None: ``cost_header`` is off).
    prices: Callable[[], PriceBook] | None = None
    #: WebSocket sessions open in this process (``[realtime] max_sessions``).
    ws_sessions: int = 0

    def origin_of(self, upstream: URL) -> Origin:
        origin = self.origins.get(upstream)
        if origin is None:
            origin = self.origins[upstream] = Origin.of(upstream)
        return origin

    def __post_init__(self) -> None:
        self.idle.set()
        self.stream_budget = StreamBudget(self.config.metering.deferred_stream_parse_mb * 1024 * 1024)


#: After the shutdown grace, cancelled handlers get this long to hand their exchanges to the meter.
SUBMIT_AFTER_CANCEL_S = 5.0


def create_app(
    config: Config,
    meter: Meter,
    gate: Gate | None = None,
    prices: Callable[[], PriceBook] | None = None,
) -> web.Application:
    """The proxy application; the caller owns running it, the meter, the budget gate and the price
    book the cost header is priced with (see :mod:`llmtally.proxy.server`)."""
    state = ProxyState(
        config=config, meter=meter, platforms=build_platforms(config), gate=gate,
        prices=prices if config.server.cost_header else None,
    )  # fmt: skip
    app = web.Application(client_max_size=config.server.max_request_body_mb * 1024 * 1024)
    app[STATE_KEY] = state
    _add_health_routes(app, meter, lambda: "draining" if state.cut_at is not None else None)
    for prefix, platform in state.platforms.items():
        app.router.add_route("*", f"/{prefix}/{{tail:.*}}", partial(_proxy, platform))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _on_startup(app: web.Application) -> None:
    state = app[STATE_KEY]
    up = state.config.upstreams
    # Idle connections stay pooled for reuse (keep-alive); the limit caps calls in flight, not the pool.
    # Both clients: one verifying TLS context, one reading of HTTPS_PROXY / HTTP_PROXY / NO_PROXY
    # (passed per request below rather than aiohttp's trust_env, which reads the environment per call).
    ssl_context = upstream_ssl_context(up.ca_file)
    state.egress = Egress.from_environment()
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=up.max_connections, ttl_dns_cache=300, ssl=ssl_context
    )
    guard_client_connector(connector)  # never reuse a connection out of step with its requests
    limits = state.config.server.head_limits
    state.session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=up.connect_timeout_s, sock_read=up.read_timeout_s),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep one client's cookies for another
        max_line_size=limits.max_line_bytes,
        max_field_size=limits.max_field_bytes,
        max_headers=limits.max_headers,
    )
    state.outbox = Outbox(asyncio.get_running_loop())
    state.pool = UpstreamPool(
        up, ssl_context=ssl_context, outbox=state.outbox, egress=state.egress, head_limits=limits
    )


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE_KEY]
    state.cut_at = asyncio.get_running_loop().time() + state.config.server.shutdown_grace_s


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE_KEY]
    # Handlers cancelled at the end of the grace period still have to submit their exchanges: the
    # runner does not wait for them, and whoever stops the meter next would lose those records.
    try:
        await asyncio.wait_for(state.idle.wait(), SUBMIT_AFTER_CANCEL_S)
    except TimeoutError:
        log.error("%d metered calls never finished after being cancelled: no record", state.in_flight)
    if state.drains:
        await asyncio.gather(*state.drains, return_exceptions=True)
    if state.session is not None:
        await state.session.close()
    if state.pool is not None:
        state.pool.close()


def _add_health_routes(app: web.Application, meter: Meter, not_ready: NotReady) -> None:
    app[HEALTH_KEY] = (meter, not_ready)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    try:
        body = await request.app[HEALTH_KEY][0].metrics()
    except (OSError, aiohttp.ClientError) as exc:
        return _json_error(503, "metrics_unavailable", f"the record process did not answer: {exc}")
    if body is None:
        return _json_error(404, "not_found", "metrics are off ([sinks.prometheus] enabled = false)")
    from llmtally.pipeline.prometheus import CONTENT_TYPE  # prometheus_client: not in every worker

    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _readyz(request: web.Request) -> web.Response:
    reason = request.app[HEALTH_KEY][1]()
    if reason is not None:
        return web.json_response({"status": reason}, status=503)
    return web.json_response({"status": "ready"})


def create_admin_app(meter: Meter, not_ready: NotReady) -> web.Application:
    """The admin listener: health, readiness and metrics; with a meter that builds records (the
    proxy's own, or the supervisor's) also ``GET /budgets`` and ``GET /calls/{request_id}``."""
    admin = web.Application()
    _add_health_routes(admin, meter, not_ready)
    if hasattr(meter, "recent"):
        admin[METER_KEY] = meter
        admin.router.add_get("/budgets", _budgets)
        admin.router.add_get("/calls/{request_id}", _call)
    return admin


METER_KEY: web.AppKey[Any] = web.AppKey("llmtally_meter")


async def _budgets(request: web.Request) -> web.Response:
    budgets = request.app[METER_KEY].budgets
    if budgets is None:
        return _json_error(404, "not_found", "no spend limits: there are no [[budgets.rules]]")
    return web.Response(body=_dumps(await budgets.report()), headers=[JSON_TYPE])


async def _call(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    record = request.app[METER_KEY].recent.get(request_id)
    if record is None:
        why = "not built yet, or older than [server] calls_window_s"
        return _json_error(404, "not_found", f"no record of {request_id} ({why})")
    return web.Response(body=_dumps(record), headers=[JSON_TYPE])


def _dumps(obj: object) -> bytes:
    from llmtally.pipeline.sinks import fallback_render, render_record

    if isinstance(obj, dict) and obj.get("event") == "llm.usage":
        try:
            return render_record(obj)  # exact Decimal costs, as the JSON lines have them
        except (TypeError, ValueError):  # quarantined in the sinks; shown as well as it can be
            return fallback_render(obj)
    return json.dumps(obj).encode()


def admin_app_of(proxy_app: web.Application) -> web.Application:
    """The admin listener's app for a single-process proxy: its meter and its readiness."""
    return create_admin_app(*proxy_app[HEALTH_KEY])


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message, "source": "llmtally"}}).encode()


JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")


def _json_error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(body=error_body(kind, message), status=status, headers=[JSON_TYPE])


async def _not_found(request: web.Request) -> web.Response:
    return _json_error(
        404, "not_found", f"no route for {request.path}; use /openai/..., /anthropic/... or /gemini/..."
    )


def _upstream_headers(
    headers: Collection[tuple[str, str]], metered: bool
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Headers to forward (hop-by-hop, Host and x-llmtally-* removed) and the tags found."""
    lowered = [(name.lower(), name, value) for name, value in headers]
    dropped = _NOT_FORWARDED
    connection = [value for low, _, value in lowered if low == "connection"]
    if connection:  # and the headers it names
        dropped = dropped | {token.strip().lower() for token in ",".join(connection).split(",")}
    out: list[tuple[str, str]] = []
    tags: dict[str, str] = {}
    for low, name, value in lowered:
        if low in dropped:
            continue
        if low.startswith("x-llmtally-"):
            if low.startswith(TAG_PREFIX) and len(low) > len(TAG_PREFIX):
                tags[header_text(low[len(TAG_PREFIX) :])] = header_text(value)
            continue
        if metered and low == "accept-encoding":
            # Only ask for encodings llmtally can decode to read the usage.
            codings = [c for c in value.split(",") if c.split(";")[0].strip().lower() in DECODABLE]
            if not codings:
                continue
            value = ",".join(codings).strip()
        out.append((name, value))
    return out, tags


def header_text(value: str) -> str:
    """A header value as text for a record.

    Both servers decode header bytes as UTF-8 with surrogate escapes, so every byte is forwarded as
    it came; but a string with escapes cannot be written as JSON (one such tag once stopped every
    sink). For the record, bytes that are valid UTF-8 read as UTF-8, others as ISO-8859-1, the
    charset RFC 9110 (§5.5, obs-text) gives header bytes above 0x7F.
    """
    if value.isascii():
        return value
    raw = value.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _kept_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str] | None:
    kept = {name: value for name in names if (value := headers.get(name)) is not None}
    return kept or None


def _client_headers(upstream: CIMultiDictProxy[str], keep_length: bool) -> list[tuple[str, str]]:
    connection_tokens = {t.strip().lower() for t in upstream.get("Connection", "").split(",")}
    out: list[tuple[str, str]] = []
    for name, value in upstream.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in connection_tokens:
            continue
        if low == "content-length" and not keep_length:
            continue
        out.append((name, value))
    return out


class Downstream(Protocol):
    """Where a metered call's answer goes: aiohttp's response objects, or the fast path's socket
    (:mod:`llmtally.proxy.fastpath`). Header values are sent as they are."""

    def gone(self) -> bool:
        """The client's connection is closed or closing."""
        ...

    def send_whole(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """A complete answer (Content-Length is added); it leaves in one send."""
        ...

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], hold_head: bool) -> None:
        """Begin a streamed answer (chunked unless ``headers`` carry Content-Length); ``hold_head``:
        send the head together with the first write instead of at once."""
        ...

    async def write(self, data: bytes) -> None:
        """Body bytes; waits while the client is slow to read. ConnectionResetError if it left."""
        ...

    async def finish(self) -> None:
        """The answer is complete."""
        ...

    def abort(self) -> None:
        """Cut the client off mid-answer (the upstream failed after the head went out)."""
        ...


class _AiohttpDownstream:
    """A :class:`Downstream` over aiohttp's request and response objects."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def send_whole(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.response = web.Response(body=body, status=status, reason=reason or None, headers=headers)

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]], hold_head: bool) -> None:
        response_type = _HeadWithFirstChunk if hold_head else web.StreamResponse
        self.response = response = response_type(status=status, reason=reason or None)
        response.headers.extend(headers)
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


async def _proxy(platform: Platform, request: web.Request) -> web.StreamResponse:
    """aiohttp's handler for every platform path the fast path leaves to it (or all, when it is off)."""
    t0 = time.perf_counter()
    state = request.app[STATE_KEY]
    if not request.raw_path.startswith("/") or not request.raw_path.isascii():
        # An absolute-form target (a forward proxy's) or raw non-ASCII bytes (a URI is ASCII).
        return _json_error(400, "bad_path", "the request target must be an ASCII path (origin-form)")
    route = platform.route(request.method, request.match_info["tail"], request.query)
    if route is None:
        return _json_error(400, "bad_path", BAD_PATH)
    if route.sign is None and request.headers.get("Upgrade", "").strip().lower() == "websocket":
        reader = session_reader(route.dialect, request.match_info["tail"], request.query)
        if reader is not None:  # a metered WebSocket API (OpenAI Realtime, …)
            from llmtally.proxy.websocket import proxy_session

            return await proxy_session(state, request, route, reader)
    if route.endpoint is None:
        upstream_url = _upstream_url(route.upstream, request.raw_path, route.prefix)
        if upstream_url is None:
            return _json_error(400, "bad_path", BAD_PATH)
        if route.batch is not None and route.sign is None:
            return await _batch_download(state, request, route, route.batch, upstream_url, t0)
        headers, _ = _upstream_headers(request.headers.items(), metered=False)
        if route.sign is not None:
            return await _signed_passthrough(state, request, route, upstream_url, headers, t0)
        return await _passthrough(state, request, upstream_url, CIMultiDict(headers), t0)
    body = await _read_body(state, request)
    if isinstance(body, web.Response):
        return body
    down = _AiohttpDownstream(request)
    await meter_call(state, down, route, request.raw_path, request.headers.items(), body, request.query, t0)
    assert down.response is not None
    return down.response


BAD_PATH = "the request path does not map to the configured upstream"


def new_metered_call(
    state: ProxyState,
    down: Downstream,
    route: Route,
    raw_path: str,
    client_headers: Collection[tuple[str, str]],
    body: bytes,
    query: Mapping[str, str],
    t0: float,
) -> MeteredCall | None:
    """The call to forward (not begun), or None when ``down`` was answered at once (a bad path)."""
    endpoint = route.endpoint
    assert endpoint is not None, "a metered call has an endpoint"
    path_qs = _upstream_path(state, route, raw_path)
    if path_qs is None:
        _send_error(down, 400, "bad_path", BAD_PATH)
        return None
    adapter = ADAPTERS[route.dialect]
    headers, tags = _upstream_headers(client_headers, metered=True)
    inject = state.config.metering.inject_stream_usage and route.stream_usage
    metered = adapter.prepare(endpoint, body, query, inject)
    named = metered.model  # as the call named it (a v1 Azure call's deployment)
    if route.model is not None:  # named by the URL (an Azure deployment, a Bedrock model id)
        metered.model = route.model
    elif metered.model is not None and metered.model in route.models:
        metered.model = route.models[metered.model]
    pricing_note = None
    if route.pricing_notes:
        pricing_note = route.pricing_notes.get(named or "") or (
            next(iter(route.pricing_notes.values())) if route.model is not None else None
        )
    if route.framing is not None:  # the URL says it streams, in the platform's framing
        metered.stream, metered.stream_format = True, route.framing
    if metered.injected_usage:  # the stream is edited: it must arrive uncompressed
        headers = [(name, value) for name, value in headers if name.lower() != "accept-encoding"]
        headers.append(("Accept-Encoding", "identity"))
    origin = state.origin_of(route.upstream)
    if route.sign is not None:  # for the exact host, path and body that go upstream
        headers = route.sign("POST", f"{origin.scheme}://{origin.host_header}{path_qs}", headers, body)
    exchange = Exchange(
        request_id=new_request_id(),
        provider=route.dialect,
        platform=route.platform,
        request=metered,
        started_at=datetime.now(UTC),
        tags=tags,
        # Counted later in the record worker (batched, off the event loop): a per-request hop to a
        # counting thread measured worse tail latency under load (docs/performance.md).
        count_input=state.config.metering.estimate_input,
        price_model=route.model if route.price_by_route_model else None,
        pricing_note=pricing_note,
    )
    call = MeteredCall(state, down, adapter, metered, exchange, origin, path_qs, headers, t0)
    call.refusal = route.refusal
    return call


#: Upstream paths remembered per proxy process (the few paths clients call, each parsed once).
PATHS_REMEMBERED = 256


def _upstream_path(state: ProxyState, route: Route, raw_path: str) -> str | None:
    """The path (and query) to request upstream for ``raw_path``, or None if it would leave the upstream."""
    remembered = state.upstream_paths.get(raw_path)
    if remembered is not None:
        return remembered
    url = _upstream_url(route.upstream, raw_path, route.prefix)
    if url is None:
        return None
    if "?" not in raw_path:  # a query may carry a key (Gemini's ?key=): not kept
        if len(state.upstream_paths) >= PATHS_REMEMBERED:
            state.upstream_paths.clear()
        state.upstream_paths[raw_path] = url.raw_path_qs
    return url.raw_path_qs


async def meter_call(
    state: ProxyState,
    down: Downstream,
    route: Route,
    raw_path: str,
    client_headers: Collection[tuple[str, str]],
    body: bytes,
    query: Mapping[str, str],
    t0: float,
) -> None:
    """Forward one metered call, answer it through ``down`` and return when it is done (aiohttp's
    handler); its exchange goes to the meter. A failure of llmtally's own is raised here."""
    call = new_metered_call(state, down, route, raw_path, client_headers, body, query, t0)
    if call is None:
        return
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    call.on_done = partial(_settle, done)
    call.begin()
    try:
        failure = await asyncio.shield(done)
    except asyncio.CancelledError:  # the client left, or shutdown cut the call off: it records why
        call.cancel()
        raise
    if failure is not None:
        raise failure


def _settle(done: asyncio.Future[BaseException | None], failure: BaseException | None) -> None:
    if not done.done():
        done.set_result(failure)


class MeteredCall:
    """One metered call, from its request to its exchange for the meter; the upstream tells it how the
    request went (a :class:`~llmtally.proxy.upstream.ResponseListener`).

    On a pooled upstream connection a call runs on callbacks alone: the request leaves from the read
    callback that completed it, and an answer that arrives whole with its head goes back from the
    upstream's read callback, with no task, future or coroutine frame per call (that bookkeeping was
    a third of a worker's CPU per call: docs/performance.md, "The callback path"). A task runs only
    where there is something to wait for: a connection to open or free up, or a body to stream.

    ``on_done`` is told once, when the call is over and its exchange submitted: with None, or with
    what cut it short (``CancelledError``, the client's ``ConnectionResetError``, or a bug).
    """

    __slots__ = (
        "adapter", "admission", "conn", "down", "exchange", "finished", "headers", "metered", "on_done",
        "origin", "path_qs", "refusal", "remaining", "state", "t0", "t_sent", "task",
    )  # fmt: skip

    def __init__(
        self,
        state: ProxyState,
        down: Downstream,
        adapter: ProviderAdapter,
        metered: MeteredRequest,
        exchange: Exchange,
        origin: Origin,
        path_qs: str,
        headers: list[tuple[str, str]],
        t0: float,
    ) -> None:
        self.state = state
        self.down = down
        self.adapter = adapter
        self.metered = metered
        self.exchange = exchange
        #: The upstream the call goes to (its pool of connections).
        self.origin = origin
        self.path_qs = path_qs
        self.headers = headers
        self.t0 = t0
        #: When the request went to the upstream: the wait from then to its head is not overhead.
        self.t_sent = 0.0
        self.on_done: Callable[[BaseException | None], None] | None = None
        #: The upstream connection while the call waits for its head there.
        self.conn: UpstreamConnection | None = None
        #: The task, while one runs the call (opening a connection, or streaming the body).
        self.task: asyncio.Task[None] | None = None
        self.finished = False
        #: The spend-limit answer, while the call waits for it.
        self.admission: Waiting | None = None
        #: The platform's error shape for a refusal, if it has its own (else the dialect's is used).
        self.refusal: Callable[[int, str], Refusal] | None = None
        #: What the call's budgets have left, as its check found them (``x-llmtally-budget-remaining``).
        self.remaining: str | None = None

    def begin(self) -> None:
        """Check the spend limits (when there are rules), then :meth:`_go`."""
        state = self.state
        state.in_flight += 1
        state.idle.clear()
        gate = state.gate
        if gate is not None:
            ex, metered = self.exchange, self.metered
            answer = gate.check(
                ask_for(ex.request_id, ex.provider, ex.platform, metered, ex.tags, ex.started_at,
                        self.adapter.max_output_tokens(metered))
            )  # fmt: skip
            if not isinstance(answer, Admission):
                self.admission = answer
                answer.add_done_callback(self._on_admission)
                return
            if not self._admitted(answer):
                return
        self._go()

    def _on_admission(self, answer: Waiting) -> None:
        self.admission = None
        if self.finished or answer.cancelled():
            return
        try:
            admitted = self._admitted(answer.result())
        except Exception as exc:  # a bug: the client must not hang on it
            self._finish(exc)
            return
        if admitted:
            self._go()

    def _admitted(self, admission: Admission) -> bool:
        """True: forward the call. Else it is answered here (429 over a limit, 503 store down)."""
        exchange = self.exchange
        if admission.rules:
            exchange.budget_exceeded = ",".join(admission.rules)
        self.remaining = admission.remaining_usd
        if admission.verdict == "go":
            return True
        status = 429 if admission.verdict == "refuse" else 503
        refusal = (self.refusal or self.adapter.refusal)(status, admission.message)
        headers = list(refusal.headers)
        if admission.retry_after_s is not None:
            headers.append(("Retry-After", str(admission.retry_after_s)))
        self._id_header(headers)
        exchange.status = status
        exchange.error = REFUSED if status == 429 else "budget_store_unavailable"
        exchange.latency_ms = (time.perf_counter() - self.t0) * 1000
        self.down.send_whole(status, "", headers, refusal.body)
        self._finish(None)
        return False

    def _id_header(self, headers: list[tuple[str, str]]) -> None:
        if self.state.config.server.request_id_header:
            headers.append((REQUEST_ID_HEADER, self.exchange.request_id))
        if self.remaining is not None:
            headers.append((REMAINING_HEADER, self.remaining))

    def _cost_header(self, headers: list[tuple[str, str]], upstream: UpstreamResponse, body: bytes) -> None:
        """``x-llmtally-cost`` of a whole 2xx answer with provider usage, priced now as its record will
        be (the parse is then the record's too: the record process does not parse it again)."""
        prices = self.state.prices
        if prices is None or not 200 <= upstream.status < 300:
            return
        if upstream.headers.get("Content-Encoding", "identity").lower() != "identity":
            return  # decoded off the loop, in the record process; no header
        exchange, adapter = self.exchange, self.adapter
        try:
            summary = adapter.parse_response(self.metered, body)
            if exchange.usage_headers:
                from_headers = read_usage(
                    summary, lambda: adapter.usage_from_headers(exchange.usage_headers or {})
                )
                if from_headers is not None:
                    summary.usage = from_headers
            if summary.usage is None or summary.usage_error is not None:
                return  # estimated later, in the record process: no cost to state now
            quote = quote_call(exchange, summary, summary.usage, prices())
        except Exception as exc:  # pricing must never fail the call
            log.warning("cost header failed: %s: %s", type(exc).__name__, exc)
            return
        exchange.summary, exchange.response_body, exchange.response_chunks = summary, None, None
        if quote.cost is not None:
            headers.append((COST_HEADER, cost_text(quote.cost.total_cost)))

    def _go(self) -> None:
        """Send the request: on a pooled connection now, else from a task once one is open or free."""
        state = self.state
        assert state.pool is not None
        self.t_sent = time.perf_counter()
        conn = state.pool.idle_connection(self.origin)
        if conn is not None:
            self._send(conn)
        else:
            self.task = start_eagerly(asyncio.get_running_loop(), self._connect_and_send())

    def cancel(self) -> None:
        """The client left, or shutdown cut the call off: stop it (the exchange says which)."""
        if self.finished:
            return
        if self.admission is not None:  # still waiting for the spend-limit check: never forwarded
            admission, self.admission = self.admission, None
            admission.cancel()
            self._cancelled()
            return
        if self.task is not None:
            self.task.cancel()  # the task notes it and finishes the call
            return
        conn, self.conn = self.conn, None
        if conn is not None:  # waiting for the head
            conn.close()
            self._cancelled()

    # The upstream's callbacks (ResponseListener) ------------------------------------------------

    def response_arrived(self, upstream: UpstreamResponse) -> None:
        self.conn = None
        head_at = time.perf_counter()
        try:
            if self._answer_whole(upstream, head_at):
                self._finish(None)
                return
        except Exception as exc:  # a bug: the client must not hang on it
            upstream.close()
            self._finish(exc)
            return
        self.task = start_eagerly(upstream.loop, self._stream_and_finish(upstream, head_at))

    def response_failed(self, exc: Exception) -> None:
        self.conn = None
        status, kind, message = _upstream_failure(exc)
        exchange = self.exchange
        exchange.status = status
        exchange.error = f"{kind}: {message}"
        exchange.latency_ms = (time.perf_counter() - self.t0) * 1000
        try:
            self._send_error(status, kind, message)
        except Exception as bug:
            self._finish(bug)
            return
        self._finish(None)

    # Steps --------------------------------------------------------------------------------------

    def _send(self, conn: UpstreamConnection) -> None:
        assert self.state.pool is not None
        self.conn = conn
        self.state.pool.send(conn, self.path_qs, self.headers, self.metered.body, self)

    async def _connect_and_send(self) -> None:
        assert self.state.pool is not None
        try:
            conn = await self.state.pool.connection(self.origin)
        except (TimeoutError, UpstreamError) as exc:
            self.task = None
            self.response_failed(exc)
            return
        except asyncio.CancelledError:
            self.task = None
            self._cancelled()
            return
        self.task = None
        self._send(conn)

    def _cancelled(self) -> None:
        _note_cancel(self.state, self.down, self.exchange)
        self.exchange.latency_ms = (time.perf_counter() - self.t0) * 1000
        self._finish(asyncio.CancelledError())

    def _answer_whole(self, upstream: UpstreamResponse, head_at: float) -> bool:
        """Note the head; answer now if the whole (non-stream) body came with it (True)."""
        exchange = self.exchange
        exchange.status = upstream.status
        if self.adapter.request_id_header:
            exchange.upstream_request_id = upstream.headers.get(self.adapter.request_id_header)
        if self.adapter.usage_headers:
            exchange.usage_headers = _kept_headers(upstream.headers, self.adapter.usage_headers)
        if upstream.error is not None and not upstream.body_arrived:
            # The body failed in the read that brought its head: nothing went to the client yet, so
            # it gets a 502; the record keeps the upstream's status and says what failed.
            upstream.close()
            _, kind, message = _upstream_failure(upstream.error)
            exchange.error = f"{kind}: {message}"
            exchange.latency_ms = (time.perf_counter() - self.t0) * 1000
            self._send_error(502, kind, message)
            return True
        if (self.metered.stream and 200 <= upstream.status < 300) or not upstream.complete:
            return False
        body = upstream.body_if_complete()
        assert body is not None
        exchange.ttfb_ms = (head_at - self.t0) * 1000
        copy = self._copy(upstream.headers.get("Content-Encoding", "identity"), stream=False)
        copy.feed(body)
        copy.hand_over()
        headers = _client_headers(upstream.headers, keep_length=False)
        self._cost_header(headers, upstream, body)
        _overhead_header(self.state, headers, self.t0, head_at - self.t_sent)
        self._id_header(headers)
        exchange.latency_ms = (time.perf_counter() - self.t0) * 1000
        self.down.send_whole(upstream.status, upstream.reason, headers, body)
        return True

    def _send_error(self, status: int, kind: str, message: str) -> None:
        headers = [JSON_TYPE]
        self._id_header(headers)
        self.down.send_whole(status, "", headers, error_body(kind, message))

    def _copy(self, encoding: str, stream: bool) -> MeteringCopy:
        metering = self.state.config.metering
        return MeteringCopy(
            self.exchange,
            self.adapter,
            self.metered,
            stream=stream,
            encoding=encoding,
            max_body=metering.max_response_body_mb * 1024 * 1024,
            budget=self.state.stream_budget,
        )

    async def _stream_and_finish(self, upstream: UpstreamResponse, head_at: float) -> None:
        failure: BaseException | None = None
        try:
            await self._stream(upstream, head_at)
        except (Exception, asyncio.CancelledError) as exc:
            failure = exc
        self.task = None
        self._finish(failure)

    async def _stream(self, upstream: UpstreamResponse, head_at: float) -> None:
        """Stream the body to the client as it arrives (its copy to the meter)."""
        state, down, exchange, metered, t0 = self.state, self.down, self.exchange, self.metered, self.t0
        ok = 200 <= upstream.status < 300
        encoding = upstream.headers.get("Content-Encoding", "identity")
        copy = self._copy(encoding, stream=ok and metered.stream)
        # An edit works on bytes as sent: a stream the upstream compressed anyway goes on unedited.
        editor = self.adapter.stream_editor(metered) if copy.stream and encoding == "identity" else None
        # Head and first chunk in one send when the chunk came with the head (an SSE stream's first
        # event usually does); otherwise the head goes at once, so a client sees the status while a
        # model is still thinking.
        stream_headers = _client_headers(upstream.headers, keep_length=editor is None)
        _overhead_header(state, stream_headers, t0, head_at - self.t_sent)
        self._id_header(stream_headers)
        try:
            hold_head = upstream.body_arrived
            await down.start(upstream.status, upstream.reason, stream_headers, hold_head=hold_head)
            async for chunk in upstream.chunks():
                if exchange.ttfb_ms is None:
                    exchange.ttfb_ms = (time.perf_counter() - t0) * 1000
                out = chunk
                if editor is not None:
                    try:
                        out = editor.feed(chunk)
                    except Exception as exc:  # an editor bug must not break the caller's stream
                        out, editor = chunk, None
                        _edit_failed(exchange, exc)
                try:
                    if out:
                        await down.write(out)  # forward first, meter second
                finally:  # metered even if the client left (a drain reads the rest for the usage)
                    copy.feed(chunk)
            copy.hand_over()
            if editor is not None:
                try:
                    out = editor.finish()
                except Exception as exc:
                    out = b""
                    _edit_failed(exchange, exc)
                if out:
                    await down.write(out)
            await down.finish()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError) or _note_cancel(state, down, exchange):
                exchange.client_disconnected = True
                _on_client_gone(state, exchange, upstream, copy)
            raise
        except (TimeoutError, UpstreamError) as exc:
            # The upstream failed mid-body: headers are sent, so all we can do is cut the client off.
            _, kind, message = _upstream_failure(exc)
            exchange.error = f"{kind} during the response body: {message}"
            down.abort()
        finally:
            exchange.latency_ms = (time.perf_counter() - t0) * 1000
            if not exchange.deferred:  # else a drain owns the response and the copy
                # What a cut-off stream carried so far; a no-op once handed over; after a bug,
                # frees the budget.
                copy.hand_over(whole=False)
                upstream.release()

    def _finish(self, failure: BaseException | None) -> None:
        """One record per metered call, whatever happened; then ``on_done``."""
        if self.finished:
            return
        self.finished = True
        state = self.state
        if not self.exchange.deferred:  # else a drain submits it
            state.meter.submit(self.exchange)
        state.in_flight -= 1
        if not state.in_flight:
            state.idle.set()
        if self.on_done is not None:
            self.on_done(failure)


def cost_text(value: Decimal) -> str:
    """USD as plain decimal text (no exponent), as the records have it."""
    text = format(value.quantize(_COST_PLACES).normalize(), "f")
    return "0" if text in ("-0", "") else text


_COST_PLACES = Decimal("1e-10")


def _send_error(down: Downstream, status: int, kind: str, message: str) -> None:
    down.send_whole(status, "", [JSON_TYPE], error_body(kind, message))


def _upstream_url(base: URL, raw_path: str, route_prefix: str) -> URL | None:
    """The upstream URL for ``raw_path`` (the client's encoding and query kept as sent), or None when
    the path is not under ``/{route_prefix}/`` as sent or could climb out of the upstream's base path."""
    prefix = f"/{route_prefix}/"
    if not raw_path.startswith(prefix):  # routed on the decoded path: "/%6fpenai/..." is not ours
        return None
    rest = raw_path[len(prefix) - 1 :]
    if _climbs_out(rest.partition("?")[0]):
        return None
    url = URL(str(base).rstrip("/") + rest, encoded=True)
    if url.host != base.host or url.port != base.port or url.scheme != base.scheme:
        return None
    return url


def _climbs_out(path: str) -> bool:
    """True when ``path``, decoded and with its dot segments resolved as a server may resolve them
    (``%2e``, ``%2f`` and backslashes included), would leave its root, and so reach an upstream path
    outside the configured base. Dot segments that stay inside (``x`` then ``..``) are fine."""
    depth = 0
    for segment in unquote(path).replace("\\", "/").split("/"):
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in ("", "."):
            depth += 1
    return False


async def _send_upstream(
    state: ProxyState, request: web.Request, url: URL, headers: CIMultiDict[str], data: Any
) -> aiohttp.ClientResponse:
    assert state.session is not None
    skip = {h for h in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type") if h not in headers}
    return await passthrough_request(
        state.session,
        state.egress,
        request.method,
        url,
        headers=headers,
        data=data,
        allow_redirects=False,
        skip_auto_headers=skip,
    )


def _upstream_failure(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, UpstreamConnectTimeout | aiohttp.ConnectionTimeoutError):
        return (
            504,
            "upstream_timeout",
            (
                "no connection to the upstream within connect_timeout_s "
                "(unreachable, or all [upstreams] max_connections busy)"
            ),
        )
    if isinstance(exc, UpstreamReadTimeout):
        return 504, "upstream_timeout", str(exc)
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return 504, "upstream_timeout", "the upstream did not answer in time"
    if isinstance(exc, PassthroughConnectError):  # worded as the fast client's UpstreamConnectError
        return 502, "upstream_unreachable", f"cannot reach the upstream: UpstreamConnectError: {exc}"
    if isinstance(exc, UpstreamProtocolError):
        return 502, "upstream_protocol_error", str(exc)
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's parse errors quote the upstream's bytes; say what failed, not what was sent.
        return 502, "upstream_protocol_error", "the upstream's answer is not valid HTTP/1.1"
    return 502, "upstream_unreachable", f"cannot reach the upstream: {type(exc).__name__}: {exc}"


def _too_slow() -> web.Response:
    response = _json_error(408, "request_timeout", "the request body arrived too slowly")
    response.force_close()
    return response


class _PacedBody:
    """A streamed request body that must keep up ``min_body_rate_bytes_s`` after ``body_grace_s``
    (a body dribbled in would hold its connection, and the upstream's, for ever)."""

    __slots__ = ("content", "grace_s", "rate", "too_slow")

    def __init__(self, content: aiohttp.StreamReader, grace_s: float, rate: int) -> None:
        self.content = content
        self.grace_s = grace_s
        self.rate = rate
        self.too_slow = False

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        start, got = loop.time(), 0
        while True:
            try:
                async with asyncio.timeout_at(start + self.grace_s + got / self.rate):
                    chunk = await self.content.readany()
            except TimeoutError:
                self.too_slow = True
                raise
            if not chunk:
                return
            got += len(chunk)
            yield chunk


async def _read_body(state: ProxyState, request: web.Request) -> bytes | web.Response:
    """A request body read whole within ``max_request_body_mb`` and the body deadline, or the answer
    (413 at once for a declared length over the limit, not after buffering the limit's worth; 408)."""
    server = state.config.server
    limit = server.max_request_body_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        response = _json_error(
            413, "request_too_large", f"the request body is over max_request_body_mb ({limit} bytes)"
        )
        response.force_close()
        return response
    try:
        async with asyncio.timeout(body_deadline_s(server, request.content_length or limit)):
            return await request.read()
    except TimeoutError:
        return _too_slow()


async def _signed_passthrough(
    state: ProxyState,
    request: web.Request,
    route: Route,
    url: URL,
    headers: list[tuple[str, str]],
    t0: float,
) -> web.StreamResponse:
    """An unmetered call the platform signs (Bedrock re-signed): the signature covers the body, so it
    is read first, within the same limits as a metered one."""
    body = await _read_body(state, request)
    if isinstance(body, web.Response):
        return body
    assert route.sign is not None
    headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
    signed = route.sign(request.method, str(url), headers, body)
    return await _passthrough(state, request, url, CIMultiDict(signed), t0, body=body)


async def _batch_download(
    state: ProxyState, request: web.Request, route: Route, batch: BatchDownload, url: URL, t0: float
) -> web.StreamResponse:
    """A GET of batch results: forwarded as any passthrough, its results metered as they pass (one
    record each, :mod:`llmtally.proxy.batch_copy`); or a batch's info, its results link relinked."""
    headers, tags = _upstream_headers(request.headers.items(), metered=True)  # only decodable encodings
    if batch.framing == "relink":
        headers = [(n, v) for n, v in headers if n.lower() != "accept-encoding"]
        headers.append(("Accept-Encoding", "identity"))
        return await _passthrough(
            state, request, url, CIMultiDict(headers), t0, relink=_relink(request, route)
        )
    metering = state.config.metering

    def tee(upstream: aiohttp.ClientResponse) -> BatchCopy | None:
        if not 200 <= upstream.status < 300:
            return None  # an error answer: no results in it
        return BatchCopy(
            state.meter,
            route,
            batch,
            encoding=upstream.headers.get("Content-Encoding", "identity"),
            tags=tags,
            t0=t0,
            max_line=metering.max_batch_line_mb * 1024 * 1024,
            max_body=metering.max_response_body_mb * 1024 * 1024,
            new_id=new_request_id,
        )

    return await _passthrough(state, request, url, CIMultiDict(headers), t0, tee=tee)


def _relink(request: web.Request, route: Route) -> tuple[bytes, bytes]:
    """What to replace in a batch's info so that its results link leads back through the proxy: the
    upstream's base as a JSON string starts, and the proxy's route as the client addressed it
    (``X-Forwarded-Proto`` says the scheme behind a TLS terminator)."""
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip() or "http"
    if scheme not in ("http", "https"):
        scheme = request.scheme
    upstream = str(route.upstream).rstrip("/")
    return (f'"{upstream}/').encode(), f'"{scheme}://{request.host}/{route.prefix}/'.encode()


#: A batch's info relinked whole up to this size (a list of batches is a few kB a batch).
MAX_RELINK_BODY = 16 * 1024 * 1024


async def _passthrough(
    state: ProxyState,
    request: web.Request,
    url: URL,
    headers: CIMultiDict[str],
    t0: float,
    body: bytes | None = None,
    tee: Callable[[aiohttp.ClientResponse], BatchCopy | None] | None = None,
    relink: tuple[bytes, bytes] | None = None,
) -> web.StreamResponse:
    """Unmetered paths: stream the request body up and the response down, no record. ``body``: read
    already (a signed call), sent as it is. ``tee``: what meters a batch download as it passes;
    ``relink``: a JSON answer's upstream links to point at the proxy (old, new)."""
    server = state.config.server
    paced: _PacedBody | None = None
    data: Any = None
    if body is not None:
        data = body
    elif request.body_exists:
        if server.min_body_rate_bytes_s > 0:
            paced = _PacedBody(request.content, server.body_grace_s, server.min_body_rate_bytes_s)
            data = paced.chunks()
        else:
            data = request.content
    if body is None and request.headers.get("Content-Length"):
        headers["Content-Length"] = request.headers["Content-Length"]
    try:
        upstream = await _send_upstream(state, request, url, headers, data)
    except (TimeoutError, aiohttp.ClientError) as exc:
        if paced is not None and paced.too_slow:
            return _too_slow()
        status, kind, message = _upstream_failure(exc)
        return _json_error(status, kind, message)
    if upstream.status < 200:  # a 101 nobody asked for (Upgrade is not forwarded): not HTTP to pass on
        upstream.close()
        return _json_error(502, "upstream_protocol_error", "the upstream switched protocols unasked (101)")
    copy: BatchCopy | None = None
    whole = False
    try:
        # llhttp lets control bytes through in a reason phrase; aiohttp refuses to write them (a 500).
        reason = upstream.reason if upstream.reason and upstream.reason.isprintable() else None
        held = b""
        if relink is not None and 200 <= upstream.status < 300:
            try:
                held, complete = await _relinked(upstream, relink)
            except (TimeoutError, aiohttp.ClientError) as exc:  # nothing went to the client yet
                upstream.close()
                return _json_error(*_upstream_failure(exc))
            if complete:
                headers_out = _client_headers(upstream.headers, keep_length=False)
                _overhead_header(state, headers_out, t0)
                return web.Response(body=held, status=upstream.status, reason=reason, headers=headers_out)
        response = web.StreamResponse(status=upstream.status, reason=reason)
        headers_out = _client_headers(upstream.headers, keep_length=True)
        _overhead_header(state, headers_out, t0)
        response.headers.extend(headers_out)
        await response.prepare(request)
        copy = tee(upstream) if tee is not None else None
        try:
            if held:  # read for a relink that did not happen: it goes as it came
                await response.write(held)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # forward first, meter second
                if copy is not None:
                    copy.feed(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            # The head is out: the only honest answer left is a cut (a clean end would pass a truncated
            # body off as whole). One line, no traceback: an upstream can fail this way on every call.
            log.warning(
                "passthrough %s %s: the upstream failed mid-body (%s); the client's answer is cut off",
                request.method, url.path, type(exc).__name__,
            )  # fmt: skip
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
            return response
        whole = True
        await response.write_eof()
        return response
    finally:
        if copy is not None:  # what passed is metered, even if the client left part-way
            copy.finish(whole)
        upstream.release()


async def _relinked(upstream: aiohttp.ClientResponse, relink: tuple[bytes, bytes]) -> tuple[bytes, bool]:
    """A small, uncompressed JSON answer with its upstream links pointed at the proxy, and True; or
    what was read of anything else (to go on unchanged) and False. A link is only ever replaced where
    a JSON string starts with the upstream's exact base."""
    if (
        upstream.headers.get("Content-Encoding", "identity").lower() != "identity"
        or "json" not in upstream.content_type
        or (upstream.content_length or 0) > MAX_RELINK_BODY
    ):
        return b"", False
    body = bytearray()
    async for chunk in upstream.content.iter_any():
        body += chunk
        if len(body) > MAX_RELINK_BODY:
            return bytes(body), False
    old, new = relink
    return bytes(body).replace(old, new), True


def _overhead_header(state: ProxyState, headers: list[tuple[str, str]], t0: float, wait: float = 0.0) -> None:
    if state.config.server.overhead_header:
        overhead = (time.perf_counter() - t0 - wait) * 1000
        headers.append((OVERHEAD_HEADER, f"{overhead:.3f}"))


def _edit_failed(exchange: Exchange, exc: Exception) -> None:
    log.error("stream editor failed; forwarding unchanged from here", exc_info=exc)
    exchange.error = f"stream edit failed: {type(exc).__name__}"


def _note_cancel(state: ProxyState, down: Downstream, exchange: Exchange) -> bool:
    """Why a handler was cancelled, noted on its exchange: True when its client went away."""
    if state.cut_at is not None and asyncio.get_running_loop().time() >= state.cut_at:
        exchange.error = "cut off at shutdown: still running when shutdown_grace_s ended"
        return False
    exchange.client_disconnected = down.gone()
    return exchange.client_disconnected


class _HeadWithFirstChunk(web.StreamResponse):
    """A stream response whose head is sent together with its first body write.

    aiohttp's own ``web.Response`` defers its head this way (the same class attribute); should a
    future aiohttp drop it, the head is simply sent on its own again.
    """

    _send_headers_immediately = False


def _on_client_gone(
    state: ProxyState, exchange: Exchange, upstream: UpstreamResponse, copy: MeteringCopy
) -> None:
    """The client left mid-response: cancel the upstream call (default) or drain it for exact usage."""
    metering = state.config.metering
    if (
        copy.stream
        and copy.metering
        and metering.on_client_disconnect == "drain"
        and len(state.drains) < metering.max_drains
    ):
        task = asyncio.get_running_loop().create_task(
            _drain(state, exchange, upstream, copy), name="llmtally-drain"
        )
        state.drains.add(task)
        task.add_done_callback(state.drains.discard)
        exchange.deferred = True  # the drain submits the record
        return
    upstream.close()  # stop paying for tokens nobody reads
    copy.hand_over(whole=False)


async def _drain(
    state: ProxyState, exchange: Exchange, upstream: UpstreamResponse, copy: MeteringCopy
) -> None:
    try:
        async with asyncio.timeout(state.config.metering.drain_timeout_s):
            async for chunk in upstream.chunks():
                copy.feed(chunk)
    except (UpstreamError, TimeoutError) as exc:
        exchange.error = f"drain after client disconnect failed: {type(exc).__name__}"
    finally:
        upstream.close()
        copy.hand_over()
        state.meter.submit(exchange)
