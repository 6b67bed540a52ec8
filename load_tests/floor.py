"""The floor of a proxy hop in Python on this machine: a forwarder with nothing but uvloop and llhttp.

Not llmtally and not a usable proxy (no metering, no header filtering, no errors, HTTP/1.1 keep-alive
only): it reads a request, rewrites ``/<provider>`` off its path, writes it to a pooled upstream
connection and copies the answer back. ``run.py --floor`` measures it beside the other targets, so
the distance from llmtally to what any Python proxy costs here comes from the same run.

    python load_tests/floor.py --port P --upstream-port U
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
import uvloop

PREFIXES = (b"/openai", b"/anthropic", b"/gemini")
PENDING: set[asyncio.Future[None]] = set()


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.pool.append(self)


class Client(asyncio.Protocol):
    def __init__(self, pool: list[Upstream], port: int) -> None:
        self.pool = pool
        self.port = port
        self.parser = httptools.HttpRequestParser(self)
        self.request: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.request.append(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        data, self.request = b"".join(self.request), []
        for prefix in PREFIXES:
            data = data.replace(b" " + prefix + b"/", b" /", 1)
        task = asyncio.ensure_future(self.forward(data))
        PENDING.add(task)
        task.add_done_callback(PENDING.discard)

    async def forward(self, data: bytes) -> None:
        if self.pool:
            upstream = self.pool.pop()
        else:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(lambda: Upstream(self.pool), "127.0.0.1", self.port)
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(data)


async def serve(port: int, upstream_port: int) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(pool, upstream_port), "127.0.0.1", port)
    print("floor proxy listening on", port, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
