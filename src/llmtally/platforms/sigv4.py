"""SigV4 for Bedrock: re-sign a request for the upstream host, and check a signature (fakes, tests).

SigV4 signs the Host and the path, so a request a client signed for the proxy is invalid upstream.
``signing = "resign"`` drops the client's signature and signs again for the upstream with the AWS
default credential chain (environment, web identity / IRSA, container and instance roles), all of it
botocore's: no hand-written crypto, and refreshable credentials are refreshed before they expire.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Headers a client's own signature brings; none of them may reach the upstream after re-signing.
CLIENT_SIGNATURE_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
SERVICE = "bedrock"


class SigningError(RuntimeError):
    """No AWS credentials could be found (the message says where botocore looked)."""


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The headers to send upstream: the client's, less its signature, plus the new one."""

    headers: list[tuple[str, str]]


class Resigner:
    """Signs requests for one region's Bedrock with the default credential chain."""

    def __init__(self, region: str, credentials: Any | None = None) -> None:
        import botocore.session

        self.region = region
        if credentials is None:
            credentials = botocore.session.get_session().get_credentials()
        if credentials is None:
            raise SigningError(
                'signing = "resign" needs AWS credentials: none in the environment '
                "(AWS_ACCESS_KEY_ID, AWS_WEB_IDENTITY_TOKEN_FILE), the shared files or the "
                "container/instance role"
            )
        self._credentials = credentials

    def sign(self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes) -> SignedRequest:
        """Sign ``method url`` (the exact path and query that go upstream) with these headers and body."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        kept = [(n, v) for n, v in headers if n.lower() not in CLIENT_SIGNATURE_HEADERS]
        # Signed: Host and every x-amz-* header (what AWS requires), and the content type. Not every
        # header: botocore's header handling is most of its cost (0.3 ms a call with a client's full set).
        signed = {n: v for n, v in kept if _must_sign(n.lower())}
        # Frozen per call: a refreshable credential is refreshed here when it is near its expiry.
        frozen = self._credentials.get_frozen_credentials()
        request = AWSRequest(method=method, url=url, data=body, headers=signed)
        SigV4Auth(frozen, SERVICE, self.region).add_auth(request)
        added = [(n, str(v)) for n, v in request.headers.items() if n.lower() in CLIENT_SIGNATURE_HEADERS]
        return SignedRequest(kept + added)


def _must_sign(name: str) -> bool:
    return name in ("host", "content-type") or name.startswith("x-amz-")


def signature_holds(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    secret_key: str,
    access_key: str,
    region: str,
) -> bool:
    """Whether the request's SigV4 ``Authorization`` is right for this host, path and body, as AWS
    checks it: the canonical request is rebuilt from what arrived, over the headers it names."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    header_map = {n.lower(): v for n, v in headers}
    auth = header_map.get("authorization", "")
    fields = dict(
        part.strip().split("=", 1)
        for part in auth.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        if "=" in part
    )
    signed = fields.get("SignedHeaders", "").split(";")
    timestamp = header_map.get("x-amz-date")
    credential = fields.get("Credential", "").split("/")
    if not timestamp or not signed or len(credential) != 5 or credential[0] != access_key:
        return False
    if credential[2] != region or credential[3] != SERVICE:
        return False
    request = AWSRequest(
        method=method, url=url, data=body, headers={n: header_map.get(n, "") for n in signed}
    )
    request.context["timestamp"] = timestamp
    signer = SigV4Auth(
        Credentials(access_key, secret_key, header_map.get("x-amz-security-token")), SERVICE, region
    )
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return hmac.compare_digest(expected, fields.get("Signature", ""))
