"""A content LRU of token counts, bounded in bytes.

Counting a growing conversation recounts only its new texts: each text's count is kept under
(tokenizer, text). The key is the text itself (exact, no hash collisions); the bound counts the
texts' sizes so memory stays below ``max_bytes`` plus a small per-entry overhead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Texts shorter than this are cheaper to encode than to look up and keep.
MIN_CACHED_CHARS = 64


class TokenCache:
    """Thread-safe LRU: ``count(tokenizer, text, encode_len)``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def count(self, tokenizer: str, text: str, encode_len: Callable[[str], int]) -> int:
        size = len(text)
        if size < MIN_CACHED_CHARS or size * 4 > self.max_bytes:
            return encode_len(text)
        key = (tokenizer, text)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        n = encode_len(text)  # outside the lock: other threads keep counting meanwhile
        with self._lock:
            self.misses += 1
            if key not in self._entries:
                self._entries[key] = n
                self._bytes += size
                while self._bytes > self.max_bytes and self._entries:
                    (_, old), _ = self._entries.popitem(last=False)
                    self._bytes -= len(old)
        return n

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes
