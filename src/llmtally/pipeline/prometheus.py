"""Prometheus metrics, fed by the records themselves and served at ``GET /metrics``.

Labels are provider (the API dialect), platform (the route: direct, azure, vertex, bedrock), model
(and endpoint/status for request counts); tag values become labels only
for the tag keys the config names, because every label value is a new time series. Money is summed
in floats here (Prometheus has no decimals); the records keep exact values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmtally.pipeline.queue import RecordPipeline

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_TYPES = ("input", "output", "cache_read", "cache_write", "reasoning", "input_image", "output_image")


class _PipelineCollector(Collector):
    def __init__(self) -> None:
        self.pipeline: RecordPipeline | None = None

    def collect(self) -> Iterable[Any]:
        pipeline = self.pipeline
        depth = GaugeMetricFamily("llmtally_queue_depth", "Records waiting to be built and delivered.")
        depth.add_metric([], pipeline.depth if pipeline else 0)
        yield depth
        dropped = CounterMetricFamily("llmtally_records_dropped", "Records dropped on queue overflow.")
        dropped.add_metric([], pipeline.stats.dropped if pipeline else 0)
        yield dropped
        for name, doc, attr in (
            ("llmtally_records_delivered", "Records a sink accepted.", "delivered"),
            ("llmtally_records_failed", "Records a sink failed after all retries (then spilled).", "failed"),
            (
                "llmtally_records_spilled",
                "Records written to a local spill file to deliver later.",
                "spilled",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["sink"])
            for sink, value in (getattr(pipeline.stats, attr) if pipeline else {}).items():
                family.add_metric([sink], value)
            yield family
        for name, doc, attr in (
            (
                "llmtally_records_quarantined",
                "Records set aside in <spill_dir>/quarantine.jsonl: unrenderable, or refused alone by a sink",
                "quarantined",
            ),
            (
                "llmtally_records_lost",
                "Records lost: their spill or quarantine write failed, or shutdown ran out of time.",
                "lost",
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["sink", "reason"])
            for (sink, reason), value in (getattr(pipeline.stats, attr) if pipeline else {}).items():
                family.add_metric([sink, reason], value)
            yield family


class PrometheusSink:
    name = "prometheus"

    def __init__(self, tag_labels: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._tags = [t.lower() for t in tag_labels]
        tag_names = [f"tag_{t}" for t in self._tags]
        r = self.registry
        self.requests = Counter(
            "llmtally_requests",
            "Metered calls.",
            ["provider", "platform", "model", "endpoint", "status", *tag_names],
            registry=r,
        )
        self.tokens = Counter(
            "llmtally_tokens",
            "Tokens by type (normalised).",
            ["provider", "platform", "model", "token_type", *tag_names],
            registry=r,
        )
        self.cost = Counter(
            "llmtally_cost_usd",
            "Cost in USD, by what it bought: item tokens, or a line item (web_search …).",
            ["provider", "platform", "model", "item", *tag_names],
            registry=r,
        )
        self.unpriced = Counter(
            "llmtally_unpriced_requests",
            "Calls with no price (unknown model).",
            ["provider", "model"],
            registry=r,
        )
        self.latency = Histogram(
            "llmtally_request_duration_seconds", "Request to last byte.", ["provider"], registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttfb = Histogram(
            "llmtally_ttfb_seconds", "Request to first upstream byte.", ["provider"], registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self._collector = _PipelineCollector()
        r.register(self._collector)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def bind(self, pipeline: RecordPipeline) -> None:
        """Expose this pipeline's queue depth and delivery counters."""
        self._collector.pipeline = pipeline

    async def write(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.observe(record)

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() validates and locks on every call (~4 µs, seven per record);
        # the children it returns are stable, so they are looked up once per label set.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: dict[str, Any]) -> None:
        provider = str(record.get("provider") or "")
        platform = str(record.get("platform") or "direct")
        model = str(record.get("model") or record.get("request_model") or "")
        tags = record.get("tags") or {}
        tag_values = [str(tags.get(t, "")) for t in self._tags]
        endpoint, status = str(record.get("endpoint") or ""), str(record.get("status"))
        self._child(self.requests, provider, platform, model, endpoint, status, *tag_values).inc()
        for token_type in TOKEN_TYPES:
            value = record.get(f"{token_type}_tokens")
            if value:
                self._child(self.tokens, provider, platform, model, token_type, *tag_values).inc(value)
        total = record.get("total_cost")
        if total is not None:
            items = [
                i for i in record.get("line_items") or () if isinstance(i, dict) and i.get("cost") is not None
            ]
            tokens = float(total) - sum(float(i["cost"]) for i in items)
            self._child(self.cost, provider, platform, model, "tokens", *tag_values).inc(max(tokens, 0.0))
            for i in items:
                self._child(self.cost, provider, platform, model, str(i.get("item")), *tag_values).inc(
                    float(i["cost"])
                )
        elif record.get("price_source") == "unknown_model" and record.get("usage_source") != "none":
            self._child(self.unpriced, provider, model).inc()
        if endpoint == "batch":
            return  # a batch result's latency is its download's so far, not a call's
        if record.get("latency_ms") is not None:
            self._child(self.latency, provider).observe(float(record["latency_ms"]) / 1000)
        if record.get("ttfb_ms") is not None:
            self._child(self.ttfb, provider).observe(float(record["ttfb_ms"]) / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def close(self) -> None:
        return None
