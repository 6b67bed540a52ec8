"""The outbox: writes held until the loop has run its current callbacks, then sent in order."""

from __future__ import annotations

import asyncio
from typing import cast

from llmtally.proxy.outbox import Outbox


async def _pair() -> tuple[asyncio.StreamWriter, asyncio.StreamReader, asyncio.Server]:
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(reader)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    return writer, await accepted, server  # the writer kept: dropping it would close its transport


async def test_writes_leave_after_the_current_callbacks_in_order() -> None:
    writer, peer, server = await _pair()
    transport = cast(asyncio.Transport, writer.transport)
    outbox = Outbox(asyncio.get_running_loop())
    outbox.write(transport, b"first ")
    outbox.write(transport, b"second")
    assert outbox.pending  # nothing sent while this callback runs
    await asyncio.sleep(0)  # the loop runs what was scheduled: the flush
    assert not outbox.pending
    async with asyncio.timeout(5):
        assert await peer.readexactly(12) == b"first second"
    transport.close()
    server.close()


async def test_flush_sends_at_once_and_a_closed_transport_is_skipped() -> None:
    writer, peer, server = await _pair()
    closed_writer, _, other = await _pair()
    transport = cast(asyncio.Transport, writer.transport)
    closed = cast(asyncio.Transport, closed_writer.transport)
    outbox = Outbox(asyncio.get_running_loop())
    outbox.write(closed, b"nobody reads this")
    closed.close()
    outbox.write(transport, b"now")
    outbox.flush()  # as before a close or a write that must follow
    assert not outbox.pending
    async with asyncio.timeout(5):
        assert await peer.readexactly(3) == b"now"
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    transport.close()
    server.close()
    other.close()
