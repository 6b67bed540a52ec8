"""A fake Gemini Live upstream on loopback (google-genai ``client.aio.live.connect``): JSON messages
in binary frames, as the API sends them: ``setupComplete`` after the setup, then per client turn
model text parts, an ``outputTranscription``, and ``turnComplete`` with the turn's ``usageMetadata``
(or, ``cut``, the connection dropped before the turn ends)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

MODEL = "gemini-3.1-flash-live-preview"
PATH = "/ws/google.ai.generativelanguage.{version}.GenerativeService.BidiGenerateContent"


def live_usage(turn: int) -> dict[str, Any]:
    return {
        "promptTokenCount": 500 * turn,
        "cachedContentTokenCount": 100 * turn,
        "responseTokenCount": 120,
        "toolUsePromptTokenCount": 10,
        "thoughtsTokenCount": 30,
        "totalTokenCount": 500 * turn + 160,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 100 * turn},
            {"modality": "AUDIO", "tokenCount": 400 * turn},
        ],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 100 * turn}],
        "responseTokensDetails": [
            {"modality": "AUDIO", "tokenCount": 100},
            {"modality": "TEXT", "tokenCount": 20},
        ],
        "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
    }


@dataclass
class LiveUpstream:
    respond: str = "done"
    received: list[list[tuple[WSMsgType, Any]]] = field(default_factory=list)
    sent: list[list[bytes]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    compressed: list[bool] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        for version in ("v1", "v1beta", "v1alpha"):
            app.router.add_get(PATH.format(version=version), self._session)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _session(self, request: web.Request) -> web.StreamResponse:
        if not request.headers.get("x-goog-api-key"):
            return web.json_response({"error": {"code": 403}}, status=403)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self.compressed.append(bool(ws.compress))
        received: list[tuple[WSMsgType, Any]] = []
        sent: list[bytes] = []
        self.received.append(received)
        self.sent.append(sent)

        async def send(message: dict[str, Any]) -> None:
            data = orjson.dumps(message)
            sent.append(data)
            await ws.send_bytes(data)

        turn = 0
        async for msg in ws:
            received.append((msg.type, msg.data))
            message = orjson.loads(msg.data)
            if "setup" in message:
                await send({"setupComplete": {}})
            elif "clientContent" in message or "client_content" in message:  # the SDK sends the latter
                turn += 1
                await send({"serverContent": {"modelTurn": {"parts": [{"text": "Hello from"}]}}})
                await send({"serverContent": {"modelTurn": {"parts": [{"text": " the live model."}]}}})
                await send({"serverContent": {"outputTranscription": {"text": "Hello from the live model."}}})
                if self.respond == "cut":
                    assert request.transport is not None
                    request.transport.abort()
                    return ws
                await send({"serverContent": {"generationComplete": True}})
                await send({"serverContent": {"turnComplete": True}, "usageMetadata": live_usage(turn)})
        return ws
