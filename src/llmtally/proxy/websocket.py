"""WebSocket sessions (OpenAI Realtime, …) proxied message by message and metered per response.

The transport only: aiohttp's WebSocket implementation on both sides (``web.WebSocketResponse`` to the
client, ``ClientSession.ws_connect`` upstream), no framing of our own. The upstream handshake comes
first, so what the client is answered mirrors what the upstream agreed to:

- **subprotocols**: the client's ``Sec-WebSocket-Protocol`` offer goes upstream as it was; the one the
  upstream picks is the one the client gets (none: none).
- **permessage-deflate**: offered upstream only when the client offered it, and accepted from the
  client only when the upstream accepted it: compressed end to end or not at all. (Each hop compresses
  on its own; the messages are the same.)
- **headers**: the client's, less hop-by-hop, the handshake's own and ``x-llmtally-*`` (whose
  ``x-llmtally-tag-*`` become the records' tags). The key (``Authorization``, ``api-key``, ``?key=``)
  goes upstream and nowhere else: it is never logged.

Then every message is forwarded as it arrives, in order, each direction in its own task: text and
binary as they came (no decode, no re-encode), pings and pongs to the other side (aiohttp's automatic
answers are off, so the peers' own keep-alives are end to end), and a close with its code and reason,
after which the close handshake completes on both sides. aiohttp reassembles fragmented messages and
each hop frames them anew, as RFC 6455 (5.4) allows an intermediary to. Only after a message has been
forwarded does the session's reader (:mod:`llmtally.providers.realtime`) look at it; a message that is
not JSON is counted and skipped, never the session dropped.

Limits (``[realtime]``): a message larger than ``max_message_mb`` closes the session with 1009 (by
aiohttp, on the side that sent it); no message either way for ``idle_timeout_s`` closes both sides with
1001; past ``max_sessions`` sessions in this process an upgrade is answered 503 before anything goes
upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from llmtally.exchange import Exchange
from llmtally.platforms import Route
from llmtally.providers.base import MeteredRequest
from llmtally.providers.realtime import SessionReader, SessionResponse
from llmtally.proxy.app import (
    HOP_BY_HOP,
    ProxyState,
    _json_error,
    _upstream_headers,
    _upstream_url,
    new_request_id,
)

log = logging.getLogger("llmtally.proxy")

#: The handshake's own headers: each hop makes its own.
_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept",
})  # fmt: skip
#: Upstream 101 headers not passed to the client (the client's handshake answer has its own).
_NOT_PASSED_BACK = HOP_BY_HOP | _HANDSHAKE | {"content-length", "date", "server"}
#: Close codes that only report what happened and may not be sent in a close frame (RFC 6455 7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})
#: An upstream that vanished without a close: the client is told the server hit a problem.
_UPSTREAM_LOST = 1011
_GOING_AWAY = 1001


@dataclass(slots=True)
class _Session:
    """What one session's two pumps share."""

    state: ProxyState
    route: Route
    reader: SessionReader
    session_id: str
    tags: dict[str, str]
    request_model: str | None
    last_message: float = field(default_factory=time.monotonic)
    client_gone: bool = False
    #: Records submitted so far.
    metered: int = 0


async def proxy_session(
    state: ProxyState, request: web.Request, route: Route, reader: SessionReader
) -> web.StreamResponse:
    """Proxy one WebSocket session of ``route``; one record per response ``reader`` says was billed."""
    realtime = state.config.realtime
    if realtime.max_sessions and state.ws_sessions >= realtime.max_sessions:
        return _json_error(503, "too_many_sessions", "this proxy holds [realtime] max_sessions sessions")
    upstream_url = _upstream_url(route.upstream, request.raw_path, route.prefix)
    if upstream_url is None:
        return _json_error(400, "bad_path", "the request path does not map to the configured upstream")
    headers, tags = _upstream_headers(request.headers.items(), metered=False)
    forwarded = CIMultiDict((name, value) for name, value in headers if name.lower() not in _HANDSHAKE)
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    deflate = "permessage-deflate" in request.headers.get("Sec-WebSocket-Extensions", "").lower()
    max_size = realtime.max_message_mb * 1024 * 1024
    session = _Session(state, route, reader, new_request_id(), tags, route.model or reader.model)
    state.ws_sessions += 1
    try:
        try:
            upstream = await _connect(state, upstream_url, forwarded, offered, deflate, max_size)
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream refused the upgrade (a bad key, an unknown model): its status, told plainly.
            return _json_error(
                exc.status or 502, "upstream_refused_upgrade", f"the upstream answered {exc.status}"
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _json_error(
                502, "upstream_unreachable", f"cannot open the upstream session: {type(exc).__name__}"
            )
        try:
            client = web.WebSocketResponse(
                protocols=(upstream.protocol,) if upstream.protocol else (),
                compress=bool(upstream.compress),
                autoclose=False,
                autoping=False,
                max_msg_size=max_size,
                decode_text=False,
            )
            for name, value in upstream._response.headers.items():
                if name.lower() not in _NOT_PASSED_BACK:
                    client.headers.add(name, value)
            await client.prepare(request)
            await _run(session, client, upstream)
        finally:
            _submit_cut_off(session)
            if reader.malformed:
                log.warning(
                    "WebSocket session %s: %d messages were not JSON events: forwarded, not metered",
                    session.session_id, reader.malformed,
                )  # fmt: skip
            if not upstream.closed:
                with contextlib.suppress(Exception):
                    await asyncio.shield(upstream.close(code=_GOING_AWAY))
        return client
    finally:
        state.ws_sessions -= 1


async def _connect(
    state: ProxyState, url: URL, headers: CIMultiDict[str], protocols: list[str], deflate: bool, max_size: int
) -> aiohttp.ClientWebSocketResponse[bool]:
    assert state.session is not None
    kwargs: dict[str, Any] = {}
    proxy = state.egress.proxy_for_url(url)
    if proxy is not None:
        if proxy.unusable is not None:
            raise aiohttp.ClientConnectionError(proxy.unusable)
        kwargs["proxy"] = proxy.url
        if proxy.authorization is not None:
            kwargs["proxy_headers"] = {"Proxy-Authorization": proxy.authorization}
    ws: aiohttp.ClientWebSocketResponse[bool] = await state.session.ws_connect(
        url,
        protocols=protocols,
        headers=headers,
        compress=15 if deflate else 0,
        autoclose=False,
        autoping=False,
        max_msg_size=max_size,
        decode_text=False,
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
        **kwargs,
    )
    return ws


async def _run(
    session: _Session, client: web.WebSocketResponse[bool], upstream: aiohttp.ClientWebSocketResponse[bool]
) -> None:
    """Both directions until the session closes (either side, or idle)."""
    reader = session.reader
    up = asyncio.create_task(_pump(session, client, upstream, reader.client_message, from_client=True))
    down = asyncio.create_task(_pump(session, upstream, client, _server_message(session), from_client=False))
    tasks = {up, down}
    idle = session.state.config.realtime.idle_timeout_s
    watchdog = asyncio.create_task(_watch_idle(session, client, upstream, idle)) if idle else None
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client's connection is lost; shutdown, at its end.
        # (Not when it is the close we started that ended the connection.)
        session.client_gone = session.client_gone or (session.state.cut_at is None and not client.closed)
        raise
    finally:
        for task in tasks:
            task.cancel()
        if watchdog is not None:
            watchdog.cancel()


def _server_message(session: _Session) -> Any:
    reader = session.reader

    def read(data: bytes, now: float) -> None:
        for response in reader.server_message(data, now):
            _submit(session, response, now)

    return read


async def _pump(session: _Session, src: Any, dst: Any, read: Any, *, from_client: bool) -> None:
    """Forward ``src``'s messages to ``dst`` until ``src`` closes, then close ``dst`` alike."""
    while True:
        msg = await src.receive()
        kind = msg.type
        now = time.monotonic()
        session.last_message = now
        if kind is WSMsgType.TEXT:
            await dst.send_frame(msg.data, WSMsgType.TEXT)
            try:
                read(msg.data, now)
            except Exception:  # a reader bug must not end the session
                log.exception("WebSocket session %s: metering failed on a message", session.session_id)
        elif kind is WSMsgType.BINARY:
            await dst.send_frame(msg.data, WSMsgType.BINARY)
            if session.reader.binary_events:  # Gemini Live sends its JSON events in binary frames
                try:
                    read(msg.data, now)
                except Exception:
                    log.exception("WebSocket session %s: metering failed on a message", session.session_id)
        elif kind is WSMsgType.PING:
            await dst.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) and msg.data not in _UNSENDABLE else 1000
            reason = (msg.extra or "").encode()
            await dst.close(code=code, message=reason)  # sends the close, waits for the other's reply
            await src.close(code=code, message=reason)  # completes src's handshake
            return
        elif kind is WSMsgType.CLOSING:
            return  # the other pump is closing this side
        else:  # CLOSED, ERROR: the connection went without a close handshake (or broke the protocol)
            if from_client:
                session.client_gone = True
            code = (
                src.close_code
                if src.close_code in (1002, 1007, 1009)
                else (_GOING_AWAY if from_client else _UPSTREAM_LOST)
            )
            with contextlib.suppress(Exception):
                await dst.close(code=code)
            return


async def _watch_idle(session: _Session, client: Any, upstream: Any, idle_s: float) -> None:
    while True:
        left = session.last_message + idle_s - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(left)
    log.info("WebSocket session %s idle for %.0f s: closed", session.session_id, idle_s)
    with contextlib.suppress(Exception):
        await client.close(code=_GOING_AWAY, message=b"idle timeout")
    with contextlib.suppress(Exception):
        await upstream.close(code=_GOING_AWAY, message=b"idle timeout")


def _submit(session: _Session, response: SessionResponse, now: float, cut_off: bool = False) -> None:
    summary = response.summary
    started = response.started if response.started is not None else now
    route = session.route
    request = MeteredRequest(
        endpoint=session.reader.endpoint,
        body=b"",
        model=session.request_model,
        stream=True,
        payload=None,
    )
    session.state.meter.submit(
        Exchange(
            request_id=new_request_id(),
            provider=route.dialect,
            platform=route.platform,
            request=request,
            started_at=datetime.now(UTC) - timedelta(seconds=max(time.monotonic() - started, 0.0)),
            summary=summary,
            status=101,
            latency_ms=(now - started) * 1000,
            ttfb_ms=(response.first_output - started) * 1000 if response.first_output is not None else None,
            client_disconnected=cut_off and session.client_gone,
            tags=session.tags,
            upstream_request_id=summary.upstream_request_id,
            session_id=session.session_id,
        )
    )
    session.metered += 1


def _submit_cut_off(session: _Session) -> None:
    """The responses the session ended in the middle of: recorded with what they produced."""
    try:
        now = time.monotonic()
        for response in session.reader.finish():
            _submit(session, response, now, cut_off=True)
    except Exception:
        log.exception("WebSocket session %s: metering its open responses failed", session.session_id)
