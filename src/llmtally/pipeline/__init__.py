"""The usage record pipeline: queueing off the request path, and the sinks records go to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtally._lazy import lazy_exports

if TYPE_CHECKING:
    from llmtally.pipeline.queue import RecordJob, RecordPipeline
    from llmtally.pipeline.sinks import JsonLinesSink, MemorySink, Sink, decimal_text, render_records

# Imported on first use (PEP 562), so a proxy worker importing llmtally.pipeline.link does not load
# the pipeline and its sinks, which only the record process runs.
_PUBLIC = {
    "RecordJob": "llmtally.pipeline.queue",
    "RecordPipeline": "llmtally.pipeline.queue",
    "JsonLinesSink": "llmtally.pipeline.sinks",
    "MemorySink": "llmtally.pipeline.sinks",
    "Sink": "llmtally.pipeline.sinks",
    "decimal_text": "llmtally.pipeline.sinks",
    "render_records": "llmtally.pipeline.sinks",
}


__getattr__ = lazy_exports(__name__, _PUBLIC)


__all__ = [
    "JsonLinesSink",
    "MemorySink",
    "RecordJob",
    "RecordPipeline",
    "Sink",
    "decimal_text",
    "render_records",
]
