"""The usage record pipeline: queueing off the request path, and the sinks records go to."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmtally.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "JsonLinesSink",
    "MemorySink",
    "RecordJob",
    "RecordPipeline",
    "Sink",
    "decimal_text",
    "render_records",
]
