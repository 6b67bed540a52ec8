"""The reference corpus (``tests/data/corpus.tar.gz``, see ``tests/data/README.md``): texts and counts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "corpus.tar.gz"


def _load() -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    with tarfile.open(ARCHIVE) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            handle = archive.extractfile(members[name])
            assert handle is not None
            return handle.read()

        refs: dict[str, dict[str, int]] = json.loads(read("corpus/refs.json"))
        # Decoded from bytes, never through universal newlines: some texts hold \r\n and lone \r.
        texts = {name: read(f"corpus/texts/{name}").decode("utf-8") for name in refs}
    return refs, texts


#: Reference counts per text name: cl100k_base, o200k_base, p50k_base, gemma3, claude_legacy, ...
REFS, TEXTS = _load()
