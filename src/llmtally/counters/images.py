"""Image dimensions from data URIs or bytes, without network and without an imaging library.

Reads the header of PNG, JPEG, GIF and WebP. Anything else (a URL, an unknown format) gives None
and the caller uses its documented default size.
"""

from __future__ import annotations

import base64
import binascii
import struct

#: Size assumed for an image llmtally cannot see (a URL): a typical 1024×1024 upload.
DEFAULT_SIZE = (1024, 1024)
#: Enough base64 to reach the size field of any supported header (JPEG may need more).
_HEAD_CHARS = 64 * 1024


def size_from_data_uri(uri: str) -> tuple[int, int] | None:
    """``data:image/png;base64,...`` → (width, height), or None."""
    if not uri.startswith("data:"):
        return None
    _, _, data = uri.partition(",")
    return size_from_base64(data)


def size_from_base64(data: str) -> tuple[int, int] | None:
    head = data[:_HEAD_CHARS]
    head = head[: len(head) - len(head) % 4]
    try:
        raw = base64.b64decode(head, validate=False)
    except (binascii.Error, ValueError):
        return None
    return size_from_bytes(raw)


def size_from_bytes(raw: bytes) -> tuple[int, int] | None:
    try:
        if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
            w, h = struct.unpack(">II", raw[16:24])
            return w, h
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", raw[6:10])
            return w, h
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            return _webp(raw)
        if raw[:2] == b"\xff\xd8":
            return _jpeg(raw)
    except struct.error:
        return None
    return None


def _webp(raw: bytes) -> tuple[int, int] | None:
    chunk = raw[12:16]
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", raw[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        b = raw[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return w, h
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(raw[24:27], "little")
        h = 1 + int.from_bytes(raw[27:30], "little")
        return w, h
    return None


def _jpeg(raw: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(raw):
        if raw[i] != 0xFF:
            i += 1
            continue
        marker = raw[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", raw[i + 2 : i + 4])[0]
        # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", raw[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None
