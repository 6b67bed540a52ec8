"""``llmtally report``: cost tables from JSON-lines usage records, summed exactly in Decimal."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import orjson

from llmtally.pipeline.sinks import decimal_text

DEFAULT_GROUPING = ("provider", "model")
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_image_tokens",
    "output_image_tokens",
)
COST_FIELDS = ("input_cost", "output_cost", "total_cost")


@dataclass
class Totals:
    records: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    input_cost: Decimal = field(default_factory=Decimal)
    output_cost: Decimal = field(default_factory=Decimal)
    total_cost: Decimal = field(default_factory=Decimal)
    #: Records without a price (unknown model): their tokens count, their cost does not.
    unpriced: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        for name in TOKEN_FIELDS:
            self.__dict__[name] += int(record.get(name) or 0)
        if record.get("total_cost") is None:
            self.unpriced += 1
            return
        for name in COST_FIELDS:
            self.__dict__[name] += _decimal(record.get(name))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _decimal(value: Any) -> Decimal:
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


class ReportError(ValueError):
    """Bad report arguments or input."""


@dataclass
class ReadCount:
    """What :func:`read_records` read: every line, and the usage records among them."""

    lines: int = 0
    records: int = 0


def read_records(
    sources: Sequence[str], stdin: IO[bytes] | None = None, count: ReadCount | None = None
) -> Iterator[dict[str, Any]]:
    """Records from files (plain or gzip) and ``-`` (stdin); lines that are not records are skipped."""
    count = count if count is not None else ReadCount()
    for source in sources or ["-"]:
        if source == "-":
            stream: IO[bytes] = stdin or sys.stdin.buffer
            yield from _lines(stream, "<stdin>", count)
            continue
        path = Path(source)
        try:
            raw = path.open("rb")
        except OSError as exc:
            raise ReportError(f"{source}: {exc.strerror or exc}") from None
        try:
            with raw:
                head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
                if head == b"\x1f\x8b":
                    with gzip.open(raw) as unzipped:
                        yield from _lines(unzipped, source, count)
                else:
                    yield from _lines(raw, source, count)
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip file, a read error
            raise ReportError(f"{source}: cannot read: {exc}") from None


def _lines(stream: Iterable[bytes], name: str, count: ReadCount) -> Iterator[dict[str, Any]]:
    for line in stream:
        count.lines += 1
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            record = json.loads(line, parse_float=Decimal)  # exact: costs are summed as written
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("event") == "llm.usage" and _well_formed(record):
            count.records += 1
            yield record


def _well_formed(record: dict[str, Any]) -> bool:
    """The fields a report reads have the record's types (a hand-edited line may not)."""
    numbers = all(
        record.get(name) is None or (isinstance(record[name], int) and not isinstance(record[name], bool))
        for name in TOKEN_FIELDS
    ) and all(isinstance(record.get(name), int | Decimal | None) for name in COST_FIELDS)
    return (
        numbers
        and isinstance(record.get("timestamp", ""), str)
        and isinstance(record.get("tags") or {}, dict)
    )


def parse_when(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(f"{name}: not an ISO date or date-time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def group_value(record: dict[str, Any], key: str) -> str:
    if key.startswith("tag:"):
        return str((record.get("tags") or {}).get(key[4:], ""))
    if key in ("day", "hour"):
        stamp = str(record.get("timestamp", ""))
        return stamp[:10] if key == "day" else stamp[:13] + ":00"
    if key == "model":
        return str(record.get("model") or record.get("request_model") or "")
    if key == "item":  # set on the parts of a record that item_parts() splits it into
        return str(record.get("item") or "tokens")
    if key == "platform":  # records written before platforms existed were all direct
        return str(record.get("platform") or "direct")
    if key in ("provider", "endpoint", "usage_source", "price_source", "service_tier", "batch_id"):
        return str(record.get(key) or "")
    raise ReportError(
        f"--by {key}: use provider, platform, model, item, endpoint, batch_id, day, hour or tag:<key>"
    )


def build_report(
    records: Iterable[dict[str, Any]],
    by: Sequence[str] = DEFAULT_GROUPING,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[Totals, dict[tuple[str, ...], Totals]]:
    totals = Totals()
    groups: dict[tuple[str, ...], Totals] = {}
    for key in by:
        group_value({}, key)  # validate the grouping before reading anything
    for record in records:
        if since or until:
            when = parse_when(str(record.get("timestamp")), "timestamp")
            if when is None or (since and when < since) or (until and when >= until):
                continue
        totals.add(record)
        for part in item_parts(record) if "item" in by else (record,):
            groups.setdefault(tuple(group_value(part, k) for k in by), Totals()).add(part)
    return totals, dict(sorted(groups.items(), key=lambda kv: (-kv[1].total_cost, kv[0])))


def item_parts(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record as what it was billed for (``--by item``): its tokens (with their costs), and each line
    item (its cost as ``total_cost``, no tokens). The parts' costs add up to the record's."""
    items = [i for i in record.get("line_items") or () if isinstance(i, dict)]
    if not items:
        return [record]
    tokens = dict(record, item="tokens")
    if record.get("total_cost") is not None:
        tokens["total_cost"] = _decimal(record.get("input_cost")) + _decimal(record.get("output_cost"))
    parts = [tokens]
    for item in items:
        priced = item.get("cost") is not None
        parts.append({
            **{k: record.get(k) for k in ("provider", "platform", "model", "request_model", "endpoint",
                                          "timestamp", "tags")},
            "item": str(item.get("item")), "input_cost": 0, "output_cost": 0,
            "total_cost": item.get("cost") if priced else None,
        })  # fmt: skip
    return parts


def _money(value: Decimal) -> str:
    return decimal_text(value)


def render_table(totals: Totals, groups: dict[tuple[str, ...], Totals], by: Sequence[str]) -> str:
    headers = [*by, "records", "input_tokens", "output_tokens", "cache_read", "cache_write", "input_cost",
               "output_cost", "total_cost"]  # fmt: skip

    def row(label: Sequence[str], t: Totals) -> list[str]:
        counts = [t.records, t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens]
        return [*label, *map(str, counts), _money(t.input_cost), _money(t.output_cost), _money(t.total_cost)]

    rows = [row(k, t) for k, t in groups.items()]
    rows.append(row(["TOTAL", *[""] * (len(by) - 1)], totals))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = range(len(by), len(headers))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows[:-1])]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    if totals.unpriced:
        out.append(f"\n{totals.unpriced} records had no price (unknown model): their cost is not included.")
    return "\n".join(out) + "\n"


def _json_totals(t: Totals) -> dict[str, Any]:
    return {k: (orjson.Fragment(_money(v)) if isinstance(v, Decimal) else v) for k, v in t.as_dict().items()}


def render_json(totals: Totals, groups: dict[tuple[str, ...], Totals], by: Sequence[str]) -> str:
    out = {
        "totals": _json_totals(totals),
        "groups": [
            {"group": dict(zip(by, key, strict=True)), **_json_totals(t)} for key, t in groups.items()
        ],
    }
    return orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_csv(groups: dict[tuple[str, ...], Totals], by: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f.name for f in fields(Totals)]
    writer.writerow([*by, *names])
    for key, t in groups.items():
        values = t.as_dict()
        writer.writerow(
            [*key, *(_money(values[n]) if isinstance(values[n], Decimal) else values[n] for n in names)]
        )
    return buffer.getvalue()


def plot_cost_over_time(records: Iterable[dict[str, Any]], path: str) -> None:
    """Hourly cost per model as a PNG (needs ``pip install 'llmtally[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("--plot needs matplotlib: pip install 'llmtally[plot]'") from None
    series: dict[str, dict[datetime, Decimal]] = {}
    for record in records:
        if record.get("total_cost") is None:
            continue
        when = parse_when(str(record["timestamp"]), "timestamp")
        assert when is not None
        bucket = when.replace(minute=0, second=0, microsecond=0)
        model = group_value(record, "model")
        per_model = series.setdefault(model, {})
        per_model[bucket] = per_model.get(bucket, Decimal(0)) + _decimal(record["total_cost"])
    figure, axes = plt.subplots(figsize=(10, 5))
    for model, points in sorted(series.items()):
        xs = sorted(points)
        axes.plot(xs, [float(points[x]) for x in xs], marker="o", label=model)  # type: ignore[arg-type]
    buckets = sorted({x for points in series.values() for x in points})
    if len(buckets) == 1:  # one hour of data: show it, not years of empty axis
        from datetime import timedelta

        axes.set_xlim(buckets[0] - timedelta(hours=1), buckets[0] + timedelta(hours=1))  # type: ignore[arg-type]
    axes.set_title("LLM cost per hour by model")
    axes.set_ylabel("USD per hour")
    axes.legend(loc="upper left", fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
