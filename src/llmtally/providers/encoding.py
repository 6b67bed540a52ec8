"""Content-Encoding for parsing: the client always gets the original bytes; parsers need them decoded."""

from __future__ import annotations

import zlib

#: Encodings llmtally can decode (metered requests only ask upstream for these).
DECODABLE = ("gzip", "deflate", "identity")


class UndecodableBody(ValueError):
    """The upstream's body is not valid in its Content-Encoding (its bytes still go to the client)."""


class Decoder:
    """Incremental decoder of a gzip/deflate body (identity passes through)."""

    __slots__ = ("_encoding", "_z")

    def __init__(self, encoding: str) -> None:
        encoding = encoding.lower()
        self._encoding = encoding
        # wbits=47: zlib or gzip framing, detected from the header.
        self._z = zlib.decompressobj(wbits=47) if encoding in ("gzip", "deflate", "x-gzip") else None

    def __call__(self, chunk: bytes) -> bytes:
        if self._z is None:
            return chunk
        try:
            return self._z.decompress(chunk)
        except zlib.error as exc:
            raise UndecodableBody(f"the response body is not valid {self._encoding}: {exc}") from None


def decode_body(encoding: str, chunks: list[bytes]) -> bytes:
    """A whole body, decoded."""
    decode = Decoder(encoding)
    return b"".join(decode(chunk) for chunk in chunks)
