"""Batch results: what a downloaded batch result says about each request it answers.

A batch's results are fetched with a GET (OpenAI ``/v1/files/{id}/content``, Anthropic
``/v1/messages/batches/{id}/results``, Gemini ``/v1beta/batches/{name}`` and its result files): one
response per request of the batch, each billed at the provider's batch price. Each provider module
says which of its paths serve results (a :class:`BatchDownload`) and reads one result (a
:class:`BatchResult`); the proxy (:mod:`llmtally.proxy.batch_copy`) splits the download as it passes
and writes one record per result.

Pure functions and dataclasses only: no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from llmtally.providers.base import Endpoint, ResponseSummary

#: Every batch record's endpoint and service tier.
BATCH = "batch"


@dataclass(slots=True)
class BatchResult:
    """One request's result in a batch download."""

    summary: ResponseSummary
    #: The id the client gave the request (OpenAI/Anthropic ``custom_id``, Gemini ``key``).
    custom_id: str | None = None
    #: The result's own HTTP status where the line has one (OpenAI ``response.status_code``); None
    #: when the request was not answered (errored before running, canceled, expired).
    status: int | None = 200
    #: The endpoint the request was for (``chat.completions``, ``embeddings``, ``messages`` …).
    endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class BatchDownload:
    """A GET whose answer holds batch results, and how to read it."""

    #: ``jsonl``: one result per line, read as the lines pass; ``json``: one JSON document (a Gemini
    #: batch operation with inlined responses), read once whole; ``relink``: no results, but the
    #: answer links to them at the upstream's own address (Anthropic's ``results_url``), which an SDK
    #: would fetch from there, past the proxy: the link is pointed back through the proxy.
    framing: Literal["jsonl", "json", "relink"]
    #: The metered endpoint every record names (``batch``), of the dialect.
    endpoint: Endpoint
    #: The batch (or result file) the URL names: the record's ``batch_id``.
    batch_id: str | None
    #: One parsed line (``jsonl``) → its result, or None when the line is not a batch result (a file
    #: of another purpose downloaded through the same path: no record).
    read_line: Callable[[Any], BatchResult | None] | None = None
    #: The whole document (``json``) → its results (none while the batch is still running).
    read_whole: Callable[[Any], list[BatchResult]] | None = None
    #: The path serves batch results only (Anthropic's): a line that cannot be read still gets a
    #: record saying so. Where the path serves any file (OpenAI, Gemini), such a line is ignored.
    results_only: bool = False


class JsonLines:
    """Splits a byte stream into lines, holding at most ``max_line`` bytes of an unfinished one.

    A line longer than that is skipped (its bytes are dropped as they come, up to its end) and
    counted in ``skipped``: memory stays bounded whatever the upstream sends.
    """

    __slots__ = ("_held", "_skipping", "max_line", "skipped")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._held = bytearray()
        self._skipping = False
        self.skipped = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif self._held:
                self._held += data[start:end]
                if len(self._held) > self.max_line:
                    self.skipped += 1
                else:
                    lines.append(bytes(self._held))
                self._held.clear()
            elif end - start > self.max_line:
                self.skipped += 1
            else:
                lines.append(data[start:end])
            start = end + 1
        rest = len(data) - start
        if rest and not self._skipping:
            if len(self._held) + rest > self.max_line:
                self._held.clear()
                self._skipping = True
                self.skipped += 1
            else:
                self._held += data[start:]
        return lines

    def finish(self) -> bytes | None:
        """End of the stream: the last line, when it had no newline."""
        held, self._skipping = bytes(self._held), False
        self._held.clear()
        return held or None
