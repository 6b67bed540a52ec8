"""The usage record pipeline: queueing off the request path, and the sinks records go to."""

from llmtally.pipeline.queue import RecordJob, RecordPipeline
from llmtally.pipeline.sinks import JsonLinesSink, MemorySink, Sink, decimal_text, render_records

__all__ = [
    "JsonLinesSink",
    "MemorySink",
    "RecordJob",
    "RecordPipeline",
    "Sink",
    "decimal_text",
    "render_records",
]
