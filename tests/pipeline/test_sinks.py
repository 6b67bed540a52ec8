"""Record rendering and the JSON-lines sink."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson

from llmtally.pipeline import JsonLinesSink, RecordPipeline, decimal_text, render_records


def test_costs_are_exact_json_numbers_rounded_to_10_places() -> None:
    assert decimal_text(Decimal("0.00034704")) == "0.00034704"
    assert decimal_text(Decimal("1E-12")) == "0"
    assert decimal_text(Decimal("0.12345678905")) == "0.123456789"  # half-even to 10 places
    assert decimal_text(Decimal("12000")) == "12000"
    line = render_records([{"event": "llm.usage", "total_cost": Decimal("0.1") + Decimal("0.2")}])
    assert line == b'{"event":"llm.usage","total_cost":0.3}\n'  # not 0.30000000000000004


async def test_file_sink_appends_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    pipeline = RecordPipeline([JsonLinesSink(str(path))])
    pipeline.start()
    from llmtally.record import TokenUsage, UsageRecord

    for i in range(3):
        pipeline.submit(
            UsageRecord(
                timestamp="2026-01-01T00:00:00.000Z", request_id=str(i), provider="openai",
                endpoint="chat.completions", request_model="gpt-4o", model="gpt-4o", stream=False,
                status=200, usage=TokenUsage(1, 2), usage_source="provider", cost=None,
                price_source="unknown_model", latency_ms=1.0, ttfb_ms=None,
            )
        )  # fmt: skip
    await pipeline.close()
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == ["0", "1", "2"]
    assert orjson.loads(lines[0])["event"] == "llm.usage"
    assert next(iter(orjson.loads(lines[0]))) == "event"
