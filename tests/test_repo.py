"""The repository stands alone: nothing at build, run or test time reads beside it (no shared data folder)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A path that climbs out of the repository, or names the project's shared data folder.
OUTSIDE = re.compile(r"""\.\./|/\s*["']shared["']|["']shared/|\bshared/(corpus|tokenizers)""")


def _build_run_and_test_files() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "pyproject.toml", *sorted((ROOT / ".ci").iterdir())]
    for folder in ("tests", "src", "load_tests", "examples"):
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)
    return files


def test_no_build_run_or_test_file_reads_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _build_run_and_test_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
        and path != Path(__file__).resolve()
        and not path.name.startswith("test_campaign_")  # its "../" are attack paths sent to the proxy
    ]
    assert found == []


def test_the_reference_corpus_ships_with_the_tests() -> None:
    from tests.counters.corpus import REFS, TEXTS

    assert len(REFS) == len(TEXTS) == 126
    assert any("\r\n" in text for text in TEXTS.values())  # read as bytes: line ends kept as they are
