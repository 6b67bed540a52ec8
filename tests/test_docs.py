"""The docs stay true: every configuration key and record field is documented."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from llmtally.config import Config
from llmtally.record import TokenUsage, UsageRecord

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            out.extend(_keys(hints[field.name], f"{prefix}{field.name}."))
        else:
            out.append(f"{prefix}{field.name}")
    return out


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for key in _keys(Config):
        section, _, name = key.rpartition(".")
        assert f"[{section}]" in text, section
        assert f"`{name}`" in text or f"[{section}] {name}`" in text, key


def test_every_record_field_is_documented() -> None:
    text = (DOCS / "records.md").read_text()
    record = UsageRecord(
        timestamp="t", request_id="r", provider="openai", endpoint="e", request_model=None, model=None,
        stream=False, status=None, usage=TokenUsage(), usage_source="none", cost=None, price_source="p",
        latency_ms=0.0, ttfb_ms=None,
    )  # fmt: skip
    for field in record.to_dict():
        assert f"| `{field}` |" in text, field
