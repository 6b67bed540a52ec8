"""Content-Encoding for parsing: the client always gets the original bytes; parsers need them decoded."""

from __future__ import annotations

import zlib

#: Encodings llmtally can decode (metered requests only ask upstream for these).
DECODABLE = ("gzip", "deflate", "identity")


class Decoder:
    """Incremental decoder of a gzip/deflate body (identity passes through)."""

    __slots__ = ("_z",)

    def __init__(self, encoding: str) -> None:
        encoding = encoding.lower()
        # wbits=47: zlib or gzip framing, detected from the header.
        self._z = zlib.decompressobj(wbits=47) if encoding in ("gzip", "deflate", "x-gzip") else None

    def __call__(self, chunk: bytes) -> bytes:
        return self._z.decompress(chunk) if self._z is not None else chunk


def decode_body(encoding: str, chunks: list[bytes]) -> bytes:
    """A whole body, decoded."""
    decode = Decoder(encoding)
    return b"".join(decode(chunk) for chunk in chunks)
