"""Tokenizer files bundled with llmtally: located, SHA-256 verified, loaded once, never downloaded."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import threading
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken_ext.openai_public as openai_public

DATA = resources.files("llmtally.counters") / "data"
_load_lock = threading.Lock()


class TokenizerUnavailable(RuntimeError):
    """A tokenizer's data is missing or does not match its published hash."""


@cache
def bundled_hashes() -> dict[str, str]:
    """``SHA256SUMS`` of the bundled files: file name → hex digest."""
    text = (DATA / "SHA256SUMS").read_text()
    pairs = (line.split() for line in text.splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def read_verified(name: str, expected: str | None = None) -> bytes:
    """Read a bundled file and check it against SHA256SUMS (and ``expected``, when given)."""
    try:
        data = (DATA / name).read_bytes()
    except FileNotFoundError:
        raise TokenizerUnavailable(f"bundled tokenizer file {name} is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    for want in (bundled_hashes().get(name), expected):
        if want is not None and digest != want:
            raise TokenizerUnavailable(f"{name}: SHA-256 {digest} does not match the published {want}")
    return data


def bundled_path(name: str) -> Path:
    return Path(str(DATA / name))


def return_freed_memory() -> None:
    """Give the heap freed after loading a tokenizer back to the OS.

    Parsing the Gemma 3 ``tokenizer.json`` (33 MB of JSON) peaks near 490 MB of RSS of which ~290 MB is
    freed garbage that glibc keeps mapped; ``malloc_trim`` returns it (measured: 487 → 194 MB).
    Elsewhere (musl, macOS) this does nothing.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# tiktoken's own constructors name the file by URL and its published hash; we run them with the
# loader swapped for one that reads the bundled copy and checks that same hash.
_CONSTRUCTORS: dict[str, Callable[[], dict[str, Any]]] = {
    "cl100k_base": openai_public.cl100k_base,
    "o200k_base": openai_public.o200k_base,
    "p50k_base": openai_public.p50k_base,
}


@cache
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding built from the bundled, hash-verified ``<name>.tiktoken`` file."""
    constructor = _CONSTRUCTORS.get(name)
    if constructor is None:
        raise TokenizerUnavailable(f"no bundled tiktoken encoding {name!r}")

    def load_bundled(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        import base64

        data = read_verified(f"{name}.tiktoken", expected_hash)
        ranks: dict[bytes, int] = {}
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return ranks

    with _load_lock:
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = load_bundled
        try:
            params = constructor()
        finally:
            openai_public.load_tiktoken_bpe = original
    encoding = tiktoken.Encoding(**params)
    # tiktoken keeps this Python copy of the ranks only to pickle the encoding (its Rust core holds
    # its own), and an encoding built here is never pickled. Dropping it: o200k_base takes 49 MB
    # of RSS instead of 75 (measured), which the record process holds for its whole life.
    encoding._mergeable_ranks = {}
    del params
    return_freed_memory()
    return encoding
