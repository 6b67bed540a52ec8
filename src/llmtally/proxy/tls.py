"""The proxy's own TLS listener (``[server] tls_cert_file``): HTTPS and WSS beside the plain port.

A second port rather than TLS sniffed on the plain one: the plain port's fast path reads requests
straight off the socket and stays untouched, a client on the same host keeps talking plain HTTP with
no certificate to trust, and each port says by its number what it speaks (no first-byte guess that
a fuzzer or a slow client could make wrong). SDKs that insist on TLS (google-genai's Live API always
opens ``wss://``; boto3 refuses Bedrock API keys over plain HTTP) use the TLS port.
"""

from __future__ import annotations

import ssl

from llmtally.config import ServerConfig


class TlsConfigError(ValueError):
    """The ``[server] tls_*`` files do not make a usable server certificate."""


def server_tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The TLS context of the proxy's TLS listener (None: no ``tls_cert_file``, no TLS listener).

    Raises :class:`TlsConfigError` when the certificate or key cannot be loaded, or do not match.
    """
    if not server.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/1.1 only: the proxy (and its WebSocket upgrades) speaks nothing else.
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"[server] tls_cert_file {server.tls_cert_file!r} / tls_key_file {server.tls_key_file!r}: "
            f"not a usable certificate and key ({exc})"
        ) from None
    return context
