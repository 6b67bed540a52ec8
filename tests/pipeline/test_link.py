"""The worker → record-process link: exchanges arrive whole, in order, all of them."""

from __future__ import annotations

import asyncio
import pickle
from datetime import UTC, datetime
from pathlib import Path

from llmtally.exchange import Exchange
from llmtally.pipeline.link import (
    LinkClient,
    LinkServer,
    WorkerReady,
    exchange_from_wire,
    exchange_to_wire,
    summary_from_wire,
    summary_to_wire,
)
from llmtally.providers import ADAPTERS
from llmtally.providers.base import ResponseSummary
from llmtally.record import TokenUsage


def _exchange(n: int = 0) -> Exchange:
    adapter = ADAPTERS["openai"]
    endpoint = adapter.route("v1/chat/completions")
    assert endpoint is not None
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi %d"}]}' % n
    request = adapter.prepare(endpoint, body, {}, inject_stream_usage=True)
    assert request.payload is not None and request.injected_usage
    summary = ResponseSummary(
        model="gpt-4o-2024-08-06",
        usage=TokenUsage(input_tokens=12, output_tokens=7, cache_read_tokens=3, reasoning_tokens=2),
        output_text=["Hel", "lo"],
        upstream_request_id="req_1",
        service_tier="default",
        error=None,
        complete=True,
    )
    return Exchange(
        request_id=f"id-{n}",
        provider="openai",
        request=request,
        started_at=datetime(2026, 11, 24, 5, 0, 0, 123456, tzinfo=UTC),
        summary=summary,
        response_body=b"{}",
        response_chunks=[b"a", b"b"],
        response_encoding="gzip",
        response_stream=True,
        status=200,
        latency_ms=51.5,
        ttfb_ms=3.25,
        client_disconnected=True,
        tags={"tenant": "acme"},
        error="something to say",
        upstream_request_id="up-1",
        count_input=True,
        platform="azure",
    )


def test_wire_form_round_trips_every_field() -> None:
    exchange = _exchange()
    back = exchange_from_wire(pickle.loads(pickle.dumps(exchange_to_wire(exchange))))
    assert back == exchange  # the request payload is parsed again from the same body


def test_a_wire_tuple_from_before_platforms_reads_as_direct() -> None:
    # Journal segments outlive an upgrade: a frame written without the platform is a direct call.
    old = exchange_to_wire(_exchange())[:-8]
    back = exchange_from_wire(old)
    assert back.platform == "direct" and back.request_id == "id-0" and back.count_input is True
    assert back.usage_headers is None and back.budget_exceeded is None


def test_a_wire_tuple_from_before_usage_headers_keeps_its_platform() -> None:
    old = exchange_to_wire(_exchange())[:-5]
    back = exchange_from_wire(old)
    assert back.platform == "azure" and back.usage_headers is None


def test_a_wire_tuple_from_before_budgets_keeps_its_usage_headers() -> None:
    exchange = _exchange()
    exchange.budget_exceeded = "per-tenant"
    assert exchange_from_wire(exchange_to_wire(exchange)).budget_exceeded == "per-tenant"
    back = exchange_from_wire(exchange_to_wire(exchange)[:-4])
    assert back.usage_headers == exchange.usage_headers and back.budget_exceeded is None


def test_a_wire_tuple_from_before_batches_has_no_batch_ids() -> None:
    exchange = _exchange()
    exchange.batch_id, exchange.custom_id = "msgbatch_01", "req-1"
    assert exchange_from_wire(exchange_to_wire(exchange)) == exchange
    back = exchange_from_wire(exchange_to_wire(exchange)[:-3])
    assert back.platform == "azure" and back.batch_id is None and back.custom_id is None


def test_a_wire_tuple_from_before_sessions_has_no_session_id() -> None:
    exchange = _exchange()
    exchange.session_id, exchange.custom_id = "c1481ed3f52c1d9b3897000000000007", "req-1"
    assert exchange_from_wire(exchange_to_wire(exchange)) == exchange
    back = exchange_from_wire(exchange_to_wire(exchange)[:-1])
    assert back.custom_id == "req-1" and back.session_id is None


def test_a_summary_from_before_cached_audio_has_none() -> None:
    summary = ResponseSummary(usage=TokenUsage(10, 5, 4, input_audio_tokens=6, cache_read_audio_tokens=3))
    wire = summary_to_wire(summary)
    assert wire is not None and summary_from_wire(wire) == summary
    usage = wire[1]
    back = summary_from_wire((wire[0], usage[:-1], *wire[2:]))
    assert back is not None and back.usage == TokenUsage(10, 5, 4, input_audio_tokens=6)


def test_wire_form_keeps_an_unparsable_request_as_it_was() -> None:
    adapter = ADAPTERS["anthropic"]
    endpoint = adapter.route("v1/messages")
    assert endpoint is not None
    request = adapter.prepare(endpoint, b"not json", {}, inject_stream_usage=True)
    exchange = Exchange("x", "anthropic", request, datetime.now(UTC), status=400)
    back = exchange_from_wire(exchange_to_wire(exchange))
    assert back == exchange and back.request.payload is None and back.request.error


async def test_every_exchange_arrives_in_order_and_close_waits_for_the_reader(tmp_path: Path) -> None:
    received: list[Exchange] = []
    ready: list[WorkerReady] = []
    server = LinkServer(str(tmp_path / "link.sock"), received.append, ready.append)
    await server.start()
    assert (tmp_path / "link.sock").stat().st_mode & 0o077 == 0  # only this user may connect
    clients = [await LinkClient.connect(server.path) for _ in range(3)]
    sent = [[_exchange(i * 1000 + n) for n in range(400)] for i in range(len(clients))]
    for i, client in enumerate(clients):
        client.send_ready(8000 + i)
    for n in range(400):
        for client, batch in zip(clients, sent, strict=True):
            client.submit(batch[n])
    # close() returns once the server has read everything this client sent.
    await asyncio.gather(*(client.close() for client in clients))
    assert await server.wait_idle(5)
    await server.close()
    assert server.received == 1200 and len(received) == 1200
    for i, batch in enumerate(sent):
        ids = [e.request_id for e in received if int(e.request_id[3:]) // 1000 == i]
        assert ids == [e.request_id for e in batch]  # per connection, in the order sent
    assert received[0] == sent[0][0]
    assert sorted(r.port for r in ready) == [8000, 8001, 8002]


async def test_a_client_knows_when_the_record_process_is_gone(tmp_path: Path) -> None:
    server = LinkServer(str(tmp_path / "link.sock"), lambda e: None, lambda r: None)
    await server.start()
    client = await LinkClient.connect(server.path)
    client.submit(_exchange(1))
    await asyncio.sleep(0.05)
    await server.close()  # the record process went away
    await asyncio.wait_for(client.closed.wait(), 5)
    client.submit(_exchange(2))  # counted and logged, never raised into the proxy
    assert client.lost_records == 1
    await client.close()


def test_a_summary_pickled_before_line_items_existed_still_gives_a_record() -> None:
    from llmtally.config import CountersConfig, PricingConfig
    from llmtally.counters import build_counters
    from llmtally.metering import build_record
    from llmtally.pricing import PriceBook

    exchange = _exchange()
    assert exchange.summary is not None
    # What the version before line items pickled: its slots, without that one (pickle sets what it finds).
    _, slots = exchange.summary.__getstate__()
    del slots["line_items"]
    old = ResponseSummary.__new__(ResponseSummary)
    for name, value in slots.items():
        setattr(old, name, value)
    exchange.summary = pickle.loads(pickle.dumps(old))
    counter = build_counters(CountersConfig())["openai"]
    record = build_record(exchange, ADAPTERS["openai"], counter, PriceBook(PricingConfig()))
    assert record.usage.input_tokens == 12 and record.line_items == () and record.cost is not None


def test_a_summary_pickled_whole_by_an_older_version_still_reads() -> None:
    # Summaries travel as tuples now; a journal frame written before carries the dataclass itself.
    exchange = _exchange()
    old = list(exchange_to_wire(exchange))
    old[16] = exchange.summary
    back = exchange_from_wire(pickle.loads(pickle.dumps(tuple(old))))
    assert back == exchange and exchange_from_wire(exchange_to_wire(back)) == exchange


def test_an_exchange_without_a_summary_round_trips() -> None:
    exchange = _exchange()
    exchange.summary = None
    assert exchange_from_wire(exchange_to_wire(exchange)).summary is None
