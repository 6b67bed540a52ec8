"""Campaign cases that are known open holes (issue 26) run as xfails, listed in one file."""

from __future__ import annotations

from pathlib import Path

import pytest

_OPEN = {
    line.strip()
    for line in (Path(__file__).parent / "campaign_open.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in _OPEN:
            item.add_marker(
                pytest.mark.xfail(strict=False, reason="open hole of issue 26 (campaign_open.txt)")
            )
