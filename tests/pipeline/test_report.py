"""llmtally report: totals equal the exact sum of the records, however they are grouped and given."""

from __future__ import annotations

import gzip
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson

from llmtally.pipeline import render_records
from tests.pipeline.test_sink_outputs import records


def write_records(path: Path) -> list[dict[str, object]]:
    rows = records(3)
    rows[1] = {**rows[1], "provider": "openai", "model": "gpt-4o", "total_cost": Decimal("0.1"),
               "input_cost": Decimal("0.07"), "output_cost": Decimal("0.03"), "tags": {"tenant": "globex"}}  # fmt: skip
    rows[2] = {**rows[2], "timestamp": "2026-11-25T09:00:00.000Z", "total_cost": Decimal("0.2"),
               "input_cost": Decimal("0.15"), "output_cost": Decimal("0.05")}  # fmt: skip
    unpriced = {
        **rows[0],
        "request_id": "x",
        "model": "mystery",
        "total_cost": None,
        "input_cost": None,
        "output_cost": None,
    }
    path.write_bytes(b"not a record\n" + render_records([*rows, unpriced]) + b'{"event":"other"}\n')
    return [*rows, unpriced]


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "llmtally", "report", *args], input=stdin, capture_output=True,
                          timeout=60, check=False)  # fmt: skip


def test_json_totals_are_the_exact_sum(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = write_records(path)
    out = orjson.loads(run(str(path), "--json").stdout)
    expected = sum((Decimal(str(r["total_cost"])) for r in rows if r["total_cost"] is not None), Decimal(0))
    assert Decimal(str(out["totals"]["total_cost"])) == expected == Decimal("0.31185")
    assert out["totals"]["records"] == 4 and out["totals"]["unpriced"] == 1
    assert out["totals"]["input_tokens"] == sum(int(r["input_tokens"]) for r in rows)  # type: ignore[call-overload]
    group_sum = sum(Decimal(str(g["total_cost"])) for g in out["groups"])
    assert group_sum == expected
    assert {tuple(g["group"].values()) for g in out["groups"]} == {
        ("anthropic", "claude-sonnet-5"), ("openai", "gpt-4o"), ("anthropic", "mystery")}  # fmt: skip


def test_grouping_filters_gzip_stdin_and_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_records(path)
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    by_tenant = orjson.loads(run(str(gz), "--by", "tag:tenant", "--json").stdout)
    assert {g["group"]["tag:tenant"]: g["total_cost"] for g in by_tenant["groups"]} == {
        "acme": 0.21185,
        "globex": 0.1,
    }
    by_day = orjson.loads(
        run("-", "--by", "day", "--json", "--since", "2026-11-25", stdin=path.read_bytes()).stdout
    )
    assert [g["group"]["day"] for g in by_day["groups"]] == ["2026-11-25"]
    assert by_day["totals"]["total_cost"] == 0.2
    csv_out = run(str(path), "--csv").stdout.decode().splitlines()
    assert csv_out[0].startswith("provider,model,records,")
    assert len(csv_out) == 4
    table = run(str(path)).stdout.decode()
    assert "TOTAL" in table and "0.31185" in table and "1 records had no price" in table


def test_plot_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    write_records(path)
    png = tmp_path / "cost.png"
    assert run(str(path), "--plot", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run(str(path), "--by", "colour")
    assert bad.returncode == 2 and b"--by colour" in bad.stderr
    missing = run(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and b"nope.jsonl" in missing.stderr


def test_by_platform_counts_records_written_before_platforms_as_direct(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = records(3)
    rows[0] = {**rows[0], "platform": "vertex", "total_cost": Decimal("0.5")}
    rows[1] = {**rows[1], "platform": "azure", "provider": "openai", "total_cost": Decimal("0.25")}
    del rows[2]["platform"]  # an older record
    rows[2] = {**rows[2], "total_cost": Decimal("0.125")}
    path.write_bytes(render_records(rows))
    out = orjson.loads(run(str(path), "--by", "platform", "--by", "provider", "--json").stdout)
    assert {tuple(g["group"].values()): g["total_cost"] for g in out["groups"]} == {
        ("vertex", "anthropic"): 0.5,
        ("azure", "openai"): 0.25,
        ("direct", "anthropic"): 0.125,
    }


def test_by_item_splits_each_record_into_what_it_paid_for(tmp_path: Path) -> None:
    from tests.pipeline.test_sink_outputs import WEB_SEARCHED

    path = tmp_path / "r.jsonl"
    rows = records(2)
    rows[0] = {**rows[0], **WEB_SEARCHED}
    path.write_bytes(render_records(rows))
    out = orjson.loads(run(str(path), "--by", "item", "--json").stdout)
    by_item = {g["group"]["item"]: g for g in out["groups"]}
    assert by_item["tokens"]["total_cost"] == 0.0237 and by_item["tokens"]["input_tokens"] == 24100
    assert by_item["web_search"]["total_cost"] == 0.02 and by_item["web_search"]["input_tokens"] == 0
    assert by_item["code_execution"]["unpriced"] == 1
    assert out["totals"]["total_cost"] == 0.0437 and out["totals"]["records"] == 2  # 0.03185 + 0.01185


def test_by_batch_id_sums_each_batch_apart_from_live_calls(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = records(3)
    rows[0] = {**rows[0], "endpoint": "batch", "batch_id": "msgbatch_01", "total_cost": Decimal("0.5")}
    rows[1] = {**rows[1], "endpoint": "batch", "batch_id": "msgbatch_01", "total_cost": Decimal("0.25")}
    rows[2] = {**rows[2], "batch_id": None, "total_cost": Decimal("0.125")}
    path.write_bytes(render_records(rows))
    out = orjson.loads(run(str(path), "--by", "batch_id", "--json").stdout)
    assert {g["group"]["batch_id"]: g["total_cost"] for g in out["groups"]} == {
        "msgbatch_01": 0.75,
        "": 0.125,
    }
