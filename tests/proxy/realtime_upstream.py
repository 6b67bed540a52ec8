"""A fake OpenAI Realtime upstream on loopback speaking the GA event schema (openai SDK
``types/realtime``): ``session.created`` on connect; each ``response.create`` answered with
``response.created``, ``response.output_item.added``, text deltas, an audio delta, a binary-free
``response.output_audio_transcript.delta`` and ``response.done`` with usage by modality."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

MODEL = "gpt-realtime"


def usage(turn: int) -> dict[str, Any]:
    """Turn ``turn``'s usage: the conversation so far re-billed as input, mostly from the cache."""
    cached_text, cached_audio = 100 * turn, 400 * turn
    return {
        "total_tokens": 1000 + 600 * turn + 200,
        "input_tokens": 1000 + 600 * turn,
        "output_tokens": 200,
        "input_token_details": {
            "text_tokens": 300 + 150 * turn,
            "audio_tokens": 700 + 450 * turn,
            "image_tokens": 0,
            "cached_tokens": cached_text + cached_audio,
            "cached_tokens_details": {
                "text_tokens": cached_text,
                "audio_tokens": cached_audio,
                "image_tokens": 0,
            },
        },
        "output_token_details": {"text_tokens": 50, "audio_tokens": 150},
    }


@dataclass
class RealtimeUpstream:
    """``respond`` = "done" (whole responses) or "cut" (the upstream drops the connection mid-response)
    or "hang" (it stops mid-response and waits: the client is the one to leave)."""

    respond: str = "done"
    #: Every message each session received from its client, and sent to it, as (type, data).
    received: list[list[tuple[WSMsgType, Any]]] = field(default_factory=list)
    sent: list[list[tuple[WSMsgType, Any]]] = field(default_factory=list)
    #: The handshake headers each session came with.
    headers: list[dict[str, str]] = field(default_factory=list)
    protocols: list[str | None] = field(default_factory=list)
    compressed: list[bool] = field(default_factory=list)
    #: Extra raw text messages sent right after session.created (malformed JSON …).
    preamble: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/realtime", self._session)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _session(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") is None:
            return web.json_response({"error": {"type": "invalid_request_error"}}, status=401)
        ws = web.WebSocketResponse(protocols=("realtime",), autoping=False, max_msg_size=0)
        self.headers.append(dict(request.headers))
        await ws.prepare(request)
        self.protocols.append(ws.ws_protocol)
        self.compressed.append(bool(ws.compress))
        received: list[tuple[WSMsgType, Any]] = []
        sent: list[tuple[WSMsgType, Any]] = []
        self.received.append(received)
        self.sent.append(sent)
        session_id = f"sess_{next(self._ids):04d}"

        async def send(event: dict[str, Any]) -> None:
            data = orjson.dumps(event).decode()
            sent.append((WSMsgType.TEXT, data))
            await ws.send_str(data)

        session = {
            "id": session_id,
            "object": "realtime.session",
            "type": "realtime",
            "model": request.query.get("model", MODEL),
        }
        await send({"type": "session.created", "event_id": f"event_{session_id}_0", "session": session})
        for raw in self.preamble:
            sent.append((WSMsgType.TEXT, raw))
            await ws.send_str(raw)
        turn = 0
        async for msg in ws:
            received.append((msg.type, msg.data))
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
                continue
            if msg.type is WSMsgType.BINARY:
                sent.append((WSMsgType.BINARY, msg.data[::-1]))
                await ws.send_bytes(msg.data[::-1])  # an echo, reversed: binary goes both ways
                continue
            if msg.type is not WSMsgType.TEXT:
                continue
            event = orjson.loads(msg.data)
            if event.get("type") == "session.update":
                await send(
                    {"type": "session.updated", "event_id": f"event_{session_id}_u", "session": session}
                )
            elif event.get("type") == "response.create":
                turn += 1
                if not await self._respond(send, session_id, turn):
                    if self.respond == "cut":
                        assert request.transport is not None
                        request.transport.abort()  # gone, no close frame
                        return ws
                    await ws.receive()  # "hang": until the proxy closes (its client left)
                    return ws
        received.append((WSMsgType.CLOSE, ws.close_code))  # aiohttp's iteration ends on it
        return ws

    async def _respond(self, send: Any, session_id: str, turn: int) -> bool:
        response_id = f"resp_{session_id}_{turn}"
        base = {"object": "realtime.response", "id": response_id, "conversation_id": "conv_1"}
        await send(
            {
                "type": "response.created",
                "event_id": f"ev_{turn}_1",
                "response": {**base, "status": "in_progress", "output": [], "usage": None},
            }
        )
        common = {
            "response_id": response_id,
            "item_id": f"item_{turn}",
            "output_index": 0,
            "content_index": 0,
        }
        for i, word in enumerate(["Hello", " there", ", friend."]):
            await send(
                {
                    "type": "response.output_audio_transcript.delta",
                    "event_id": f"ev_{turn}_t{i}",
                    **common,
                    "delta": word,
                }
            )
        await send(
            {
                "type": "response.output_audio.delta",
                "event_id": f"ev_{turn}_a",
                **common,
                "delta": "UklGRiQAAABXQVZF" * 64,
            }
        )
        if self.respond != "done":
            return False
        await send(
            {
                "type": "response.output_audio_transcript.done",
                "event_id": f"ev_{turn}_td",
                **common,
                "transcript": "Hello there, friend.",
            }
        )
        await send(
            {
                "type": "response.done",
                "event_id": f"ev_{turn}_d",
                "response": {**base, "status": "completed", "output": [], "usage": usage(turn)},
            }
        )
        return True
