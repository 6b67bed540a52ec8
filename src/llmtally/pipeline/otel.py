"""OpenTelemetry sink (``pip install 'llmtally[otel]'``): GenAI semantic-convention metrics and spans.

Metrics: ``gen_ai.client.token.usage`` (histogram, ``gen_ai.token.type`` = input | output),
``gen_ai.client.operation.duration`` (seconds) and ``llmtally.cost.usd`` (the conventions define no
cost metric yet). Each record also becomes a client span with ``gen_ai.*`` attributes and
``llmtally.cost.usd``. Exporters come from the standard ``OTEL_*`` environment variables (OTLP over
HTTP by default); tests pass in-memory providers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

#: The conventions' recommended token-usage buckets.
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
#: gen_ai.operation.name per endpoint.
OPERATIONS = {
    "chat.completions": "chat",
    "responses": "chat",
    "messages": "chat",
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
}
#: gen_ai.provider.name values of the conventions: the dialect's own API …
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}
#: … or the platform it went through (Claude on Vertex is gcp.vertex_ai, as Gemini there).
PLATFORM_PROVIDER_NAMES = {"azure": "azure.ai.openai", "vertex": "gcp.vertex_ai", "bedrock": "aws.bedrock"}


class OTelSink:
    name = "otel"

    def __init__(self, meter_provider: MeterProvider, tracer_provider: TracerProvider) -> None:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

        meter = meter_provider.get_meter("llmtally")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Measures number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip
        self._cost = meter.create_counter("llmtally.cost.usd", unit="USD", description="Cost of GenAI calls")
        self._tracer = tracer_provider.get_tracer("llmtally")
        self._meter_provider = meter_provider if isinstance(meter_provider, SdkMeterProvider) else None
        self._tracer_provider = tracer_provider

    @classmethod
    def from_environment(cls) -> OTelSink:
        """OTLP exporters configured by the standard OTEL_* environment variables."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {"service.name": "llmtally"}
        )  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win
        meters = SdkMeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
        )
        tracer = SdkTracerProvider(resource=resource)
        tracer.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(meters, tracer)

    async def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.observe(record)

    def observe(self, record: dict[str, Any]) -> None:
        provider, platform = str(record.get("provider")), str(record.get("platform") or "direct")
        attrs: dict[str, Any] = {
            "gen_ai.provider.name": PLATFORM_PROVIDER_NAMES.get(platform)
            or PROVIDER_NAMES.get(provider, provider),
            "gen_ai.operation.name": OPERATIONS.get(str(record.get("endpoint")), str(record.get("endpoint"))),
        }
        if record.get("request_model"):
            attrs["gen_ai.request.model"] = record["request_model"]
        if record.get("model"):
            attrs["gen_ai.response.model"] = record["model"]
        if record.get("error"):
            attrs["error.type"] = str(record["error"]).split(":")[0]
        if record.get("fake_upstream"):
            attrs["llmtally.fake_upstream"] = True  # made-up usage: keep it apart from real spend
        if record.get("usage_source") != "none":
            self._tokens.record(int(record.get("input_tokens") or 0), {**attrs, "gen_ai.token.type": "input"})
            self._tokens.record(
                int(record.get("output_tokens") or 0), {**attrs, "gen_ai.token.type": "output"}
            )
        seconds = float(record.get("latency_ms") or 0) / 1000
        if record.get("endpoint") != "batch":  # a batch result's latency is its download's, not a call's
            self._duration.record(seconds, attrs)
        cost = record.get("total_cost")
        if cost is not None:
            self._cost.add(float(cost), attrs)
        self._span(record, attrs, seconds, cost)

    def _span(self, record: dict[str, Any], attrs: dict[str, Any], seconds: float, cost: Any) -> None:
        start = datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
        start_ns = int(start.timestamp() * 1e9)
        name = f"{attrs['gen_ai.operation.name']} {record.get('request_model') or ''}".strip()
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, start_time=start_ns)
        span_attrs = {
            **attrs,
            "gen_ai.usage.input_tokens": int(record.get("input_tokens") or 0),
            "gen_ai.usage.output_tokens": int(record.get("output_tokens") or 0),
            "gen_ai.usage.cache_read.input_tokens": int(record.get("cache_read_tokens") or 0),
            "gen_ai.usage.cache_creation.input_tokens": int(record.get("cache_write_tokens") or 0),
            # No GenAI convention names image tokens yet: llmtally's own, parts of the two above.
            "llmtally.usage.input_image_tokens": int(record.get("input_image_tokens") or 0),
            "llmtally.usage.output_image_tokens": int(record.get("output_image_tokens") or 0),
            "llmtally.usage_source": str(record.get("usage_source")),
            "llmtally.request_id": str(record.get("request_id")),
        }
        if cost is not None:
            span_attrs["llmtally.cost.usd"] = float(cost)
        for key in ("batch_id", "custom_id", "session_id"):
            if record.get(key) is not None:
                span_attrs[f"llmtally.{key}"] = str(record[key])
        span.set_attributes(span_attrs)
        if record.get("error"):
            span.set_status(Status(StatusCode.ERROR, str(record["error"])))
        span.end(end_time=start_ns + int(seconds * 1e9))

    async def close(self) -> None:
        for provider in (self._meter_provider, self._tracer_provider):
            shutdown = getattr(provider, "shutdown", None)
            if callable(shutdown):
                shutdown()
