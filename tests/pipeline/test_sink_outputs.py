"""What each sink writes: Prometheus text, OpenTelemetry metrics and spans, protobuf, rotated files."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmtally.config import Config, PrometheusSinkConfig, SinksConfig
from llmtally.pipeline.protobuf import ProtobufFileSink, money_value, read_delimited
from llmtally.pipeline.sinks import RotatingFileSink
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.conftest import API_KEY

CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'


def sample(name: str, labels: dict[str, str], families: list[Any]) -> float:
    for family in families:
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_prometheus_metrics_parse_and_count(upstream: FakeUpstream) -> None:
    sinks = SinksConfig(prometheus=PrometheusSinkConfig(tag_labels=["tenant"]))
    proxy = await start_proxy(config_for_upstream(upstream.url, Config(sinks=sinks)))
    try:
        async with aiohttp.ClientSession() as session:
            for tenant in ("acme", "acme", "globex"):
                headers = {"Authorization": f"Bearer {API_KEY}", "x-llmtally-tag-tenant": tenant}
                async with session.post(
                    proxy.url + "/openai/v1/chat/completions", data=CHAT, headers=headers
                ) as r:
                    await r.read()
            await proxy.flush()
            async with session.get(proxy.url + "/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
    finally:
        await proxy.stop()
    families = list(text_string_to_metric_families(text))
    labels = {"provider": "openai", "platform": "direct", "model": "gpt-4o-2024-08-06"}
    assert sample("llmtally_requests_total", {**labels, "tag_tenant": "acme"}, families) == 2
    assert (
        sample("llmtally_tokens_total", {**labels, "token_type": "input", "tag_tenant": "globex"}, families)
        == 1200
    )
    assert (
        sample("llmtally_tokens_total", {**labels, "token_type": "reasoning", "tag_tenant": "acme"}, families)
        == 256
    )
    assert (
        abs(sample("llmtally_cost_usd_total", {**labels, "tag_tenant": "acme"}, families) - 2 * 0.00472)
        < 1e-12
    )
    assert sample("llmtally_request_duration_seconds_count", {"provider": "openai"}, families) == 3
    assert sample("llmtally_ttfb_seconds_count", {"provider": "openai"}, families) == 3
    assert sample("llmtally_queue_depth", {}, families) == 0
    assert sample("llmtally_records_delivered_total", {"sink": "memory"}, families) == 3


async def test_prometheus_has_no_tag_labels_unless_configured(proxy: Any) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {API_KEY}", "x-llmtally-tag-tenant": "acme"}
        async with session.post(proxy.url + "/openai/v1/chat/completions", data=CHAT, headers=headers) as r:
            await r.read()
        await proxy.flush()
        async with session.get(proxy.url + "/metrics") as response:
            text = await response.text()
    assert "tag_tenant" not in text and "acme" not in text


def records(n: int = 3) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        out.append({
            "event": "llm.usage", "timestamp": f"2026-11-24T10:0{i}:00.000Z", "request_id": f"r{i}",
            "provider": "anthropic", "endpoint": "messages", "request_model": "claude-sonnet-5", "model": "claude-sonnet-5",
            "stream": bool(i % 2), "status": 200, "input_tokens": 12050, "output_tokens": 400, "cache_read_tokens": 10000,
            "cache_write_tokens": 2000, "cache_write_1h_tokens": 500, "reasoning_tokens": None, "total_tokens": 12450,
            "input_audio_tokens": 0, "output_audio_tokens": 0, "usage_source": "provider", "estimated_input_tokens": 5,
            "input_cost": Decimal("0.00785"), "output_cost": Decimal("0.004"), "total_cost": Decimal("0.01185"),
            "currency": "USD", "price_source": "genai-prices", "price_version": "abc", "priced_model": "claude-sonnet-5",
            "pricing_note": None, "service_tier": "standard", "inference_geo": None, "latency_ms": 1200.5,
            "ttfb_ms": 300.25, "client_disconnected": False, "tags": {"tenant": "acme"}, "upstream_request_id": "u",
            "error": None, "platform": "direct", "batch_id": None, "custom_id": None,
        })  # fmt: skip
    return out


async def test_protobuf_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "records.pb"
    sink = ProtobufFileSink(str(path))
    await sink.write(records(2))
    await sink.write(records(1))
    messages = list(read_delimited(path))
    assert len(messages) == 3
    m = messages[1]
    assert (m.request_id, m.provider, m.model, m.stream, m.status) == (
        "r1",
        "anthropic",
        "claude-sonnet-5",
        True,
        200,
    )
    assert (m.input_tokens, m.cache_write_1h_tokens, m.total_tokens) == (12050, 500, 12450)
    assert not m.HasField("reasoning_tokens")  # null stays null
    assert money_value(m.total_cost) == Decimal("0.01185") and m.total_cost.currency_code == "USD"
    assert (m.total_cost.units, m.total_cost.nanos) == (0, 11_850_000)
    assert m.timestamp.ToJsonString() == "2026-11-24T10:01:00Z"
    assert dict(m.tags) == {"tenant": "acme"} and m.ttfb_ms == 300.25


WEB_SEARCHED = {
    "line_items": [
        {"item": "web_search", "quantity": 2, "unit": "search", "unit_price": Decimal("0.01"),
         "cost": Decimal("0.02"), "source": "genai-prices"},
        {"item": "code_execution", "quantity": 1, "unit": "use", "unit_price": None, "cost": None,
         "source": "unknown_model"},
    ],
    "total_cost": Decimal("0.03185"),
}  # fmt: skip


async def test_line_items_reach_protobuf_and_prometheus_with_an_item_label(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from llmtally.pipeline import render_records
    from llmtally.pipeline.prometheus import PrometheusSink

    record = {**records(1)[0], **WEB_SEARCHED}
    line = orjson.loads(render_records([record]))  # money inside line items is a JSON number too
    assert [(i["unit_price"], i["cost"]) for i in line["line_items"]] == [(0.01, 0.02), (None, None)]
    path = tmp_path / "records.pb"
    sink = ProtobufFileSink(str(path))
    await sink.write([record])
    (m,) = list(read_delimited(path))
    assert [(i.item, i.quantity, i.unit, i.source) for i in m.line_items] == [
        ("web_search", 2, "search", "genai-prices"), ("code_execution", 1, "use", "unknown_model")]  # fmt: skip
    assert money_value(m.line_items[0].cost) == Decimal("0.02") and not m.line_items[1].HasField("cost")
    metrics = PrometheusSink()
    await metrics.write([record])
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert abs(sample("llmtally_cost_usd_total", {"item": "web_search"}, families) - 0.02) < 1e-12
    assert abs(sample("llmtally_cost_usd_total", {"item": "tokens"}, families) - 0.01185) < 1e-12


async def test_opentelemetry_genai_metrics_and_spans() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llmtally.pipeline.otel import OTelSink

    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer = TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    sink = OTelSink(MeterProvider(metric_readers=[reader]), tracer)
    await sink.write(records(2))
    via_vertex = {
        **records(1)[0],
        "request_id": "v",
        "platform": "vertex",
        "request_model": "claude-on-vertex",
    }
    await sink.write([via_vertex])  # the conventions name the platform, not the dialect, there
    data = reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    usage = metrics["gen_ai.client.token.usage"]
    on_vertex = [
        p for p in usage.data.data_points if p.attributes["gen_ai.request.model"] == "claude-on-vertex"
    ]
    assert {p.attributes["gen_ai.provider.name"] for p in on_vertex} == {"gcp.vertex_ai"}
    by_type = {p.attributes["gen_ai.token.type"]: p for p in usage.data.data_points if p not in on_vertex}
    assert (by_type["input"].sum, by_type["input"].count) == (24100, 2)
    assert by_type["output"].sum == 800
    assert by_type["input"].attributes["gen_ai.provider.name"] == "anthropic"
    assert by_type["input"].attributes["gen_ai.request.model"] == "claude-sonnet-5"
    assert usage.unit == "{token}"
    duration = metrics["gen_ai.client.operation.duration"].data.data_points[0]
    assert abs(duration.sum - 2.401) < 1e-9 and metrics["gen_ai.client.operation.duration"].unit == "s"
    assert abs(metrics["llmtally.cost.usd"].data.data_points[0].value - 0.0237) < 1e-12
    spans = exporter.get_finished_spans()[:2]
    attributes = spans[0].attributes or {}
    assert attributes["gen_ai.usage.input_tokens"] == 12050
    assert attributes["gen_ai.usage.output_tokens"] == 400
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 10000
    assert attributes["gen_ai.usage.cache_creation.input_tokens"] == 2000
    assert attributes["gen_ai.response.model"] == "claude-sonnet-5"
    assert attributes["llmtally.cost.usd"] == 0.01185
    assert spans[0].name == "chat claude-sonnet-5"
    assert (spans[0].end_time - spans[0].start_time) == 1_200_500_000  # type: ignore[operator]


async def test_file_sink_rotates_by_size(tmp_path: Path) -> None:
    from llmtally.pipeline import render_records

    line = len(render_records(records(1)))
    path = tmp_path / "records.jsonl"
    sink = RotatingFileSink(str(path), max_bytes=2 * line + 10, backups=2)  # two records per file
    for _ in range(7):
        await sink.write(records(1))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["records.jsonl", "records.jsonl.1", "records.jsonl.2"]  # the oldest rotated away
    assert [p.stat().st_size // line for p in sorted(tmp_path.iterdir())] == [1, 2, 2]


async def test_protobuf_carries_every_record_field_and_the_fake_upstream_flag(tmp_path: Path) -> None:
    from llmtally.pipeline.proto import usage_record_pb2 as pb

    json_fields = {*records(1)[0], "fake_upstream"} - {"event", "currency"}  # currency: inside each Money
    assert json_fields <= set(pb.UsageRecord.DESCRIPTOR.fields_by_name)
    path = tmp_path / "records.pb"
    flagged = [{**records(1)[0], "fake_upstream": True}, records(1)[0]]
    await ProtobufFileSink(str(path)).write(flagged)
    assert [m.fake_upstream for m in read_delimited(path)] == [True, False]


BATCH_RESULT = {"endpoint": "batch", "service_tier": "batch", "batch_id": "msgbatch_01", "custom_id": "req-1",
                "ttfb_ms": None}  # fmt: skip


async def test_batch_results_reach_every_sink_with_their_ids_and_no_call_latency(tmp_path: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client.parser import text_string_to_metric_families

    from llmtally.pipeline.otel import OTelSink
    from llmtally.pipeline.prometheus import PrometheusSink

    record = {**records(1)[0], **BATCH_RESULT}
    path = tmp_path / "records.pb"
    await ProtobufFileSink(str(path)).write([record, records(1)[0]])
    batch, live = read_delimited(path)
    assert (batch.batch_id, batch.custom_id, batch.endpoint) == ("msgbatch_01", "req-1", "batch")
    assert not live.HasField("batch_id") and not live.HasField("custom_id")
    # A result's latency is how far its download had got: not a call's duration.
    metrics = PrometheusSink()
    await metrics.write([record])
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert sample("llmtally_requests_total", {"endpoint": "batch"}, families) == 1
    with pytest.raises(AssertionError, match="no sample"):  # no duration observed at all
        sample("llmtally_request_duration_seconds_count", {"provider": "anthropic"}, families)
    reader, exporter, tracer = InMemoryMetricReader(), InMemorySpanExporter(), TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))
    await OTelSink(MeterProvider(metric_readers=[reader]), tracer).write([record])
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert "gen_ai.client.token.usage" in names and "gen_ai.client.operation.duration" not in names
    (span,) = exporter.get_finished_spans()
    assert (span.attributes or {})["llmtally.batch_id"] == "msgbatch_01"
    assert (span.attributes or {})["llmtally.custom_id"] == "req-1"
