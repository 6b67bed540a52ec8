"""The sinks a configuration asks for, and the pipeline that feeds them."""

from __future__ import annotations

import logging

from llmtally.config import Config
from llmtally.pipeline.prometheus import PrometheusSink
from llmtally.pipeline.queue import RecordPipeline
from llmtally.pipeline.sinks import JsonLinesSink, RotatingFileSink, Sink, WebhookSink

log = logging.getLogger("llmtally.pipeline")


def build_sinks(config: Config) -> list[Sink]:
    """``[logging] destination`` (stdout or a file) first, then every configured ``[sinks.*]``."""
    sinks: list[Sink] = [JsonLinesSink(config.logging.destination)]
    s = config.sinks
    if s.file.path:
        sinks.append(RotatingFileSink(s.file.path, s.file.max_mb * 1024 * 1024, s.file.backups))
    if s.prometheus.enabled:
        sinks.append(PrometheusSink(s.prometheus.tag_labels))
    if s.webhook.url:
        sinks.append(WebhookSink(s.webhook.url, s.webhook.timeout_s, s.webhook.headers))
    if s.protobuf.path:
        from llmtally.pipeline.protobuf import ProtobufFileSink

        sinks.append(ProtobufFileSink(s.protobuf.path))
    if s.postgres.dsn:
        from llmtally.pipeline.postgres import PostgresSink

        sinks.append(PostgresSink(s.postgres.dsn, s.postgres.connect_timeout_s))
    if s.otel.enabled:
        from llmtally.pipeline.otel import OTelSink

        sinks.append(OTelSink.from_environment())
    return sinks


def build_pipeline(config: Config, extra: list[Sink] | None = None) -> RecordPipeline:
    pipeline = RecordPipeline([*build_sinks(config), *(extra or [])], config.pipeline)
    for sink in pipeline.sinks:
        if isinstance(sink, PrometheusSink):
            sink.bind(pipeline)
    return pipeline


def prometheus_of(pipeline: RecordPipeline) -> PrometheusSink | None:
    return next((s for s in pipeline.sinks if isinstance(s, PrometheusSink)), None)
