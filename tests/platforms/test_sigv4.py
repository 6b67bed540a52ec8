"""SigV4: the checker agrees with boto3's own signer, and re-signing makes a request valid upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import boto3
import pytest
from aiohttp import web
from botocore.credentials import Credentials

from llmtally.platforms.sigv4 import Resigner, SigningError, signature_holds

ACCESS_KEY = "AKIDLLMTALLYTEST"
SECRET_KEY = "llmtally-test-secret-key-0123456789"
REGION = "us-east-1"
ARN_MODEL = (
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0"
)


@dataclass
class Seen:
    """What the loopback 'Bedrock' received, byte for byte."""

    requests: list[tuple[str, str, list[tuple[str, str]], bytes]] = field(default_factory=list)


@pytest.fixture
async def bedrock() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.requests.append((request.method, request.raw_path, list(request.headers.items()), body))
        answer = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": {}}
        return web.json_response(answer)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


def _invoke(endpoint: str, model: str) -> None:
    client = boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []})
    client.invoke_model(modelId=model, body=body, contentType="application/json")


def _holds(method: str, origin: str, raw_path: str, headers: list[tuple[str, str]], body: bytes) -> bool:
    return signature_holds(method, origin + raw_path, headers, body, SECRET_KEY, ACCESS_KEY, REGION)


@pytest.mark.parametrize("model", ["anthropic.claude-3-haiku-20240307-v1:0", ARN_MODEL])
async def test_the_checker_accepts_what_boto3_signs(bedrock: tuple[str, Seen], model: str) -> None:
    origin, seen = bedrock
    await asyncio.to_thread(_invoke, origin, model)
    method, raw_path, headers, body = seen.requests[0]
    assert "%3A" in raw_path  # boto3 sends ':' encoded: the path as sent is the path signed
    assert _holds(method, origin, raw_path, headers, body)


async def test_a_signature_for_the_proxy_is_invalid_upstream(bedrock: tuple[str, Seen]) -> None:
    origin, seen = bedrock
    await asyncio.to_thread(_invoke, origin, "anthropic.claude-3-haiku-20240307-v1:0")
    method, raw_path, headers, body = seen.requests[0]
    moved = [(n, "bedrock-runtime.us-east-1.amazonaws.com" if n.lower() == "host" else v) for n, v in headers]
    assert not _holds(method, "https://bedrock-runtime.us-east-1.amazonaws.com", raw_path, moved, body)
    assert not _holds(method, origin, raw_path, headers, body + b" ")  # the body is signed too


async def test_resigning_makes_the_request_valid_for_the_upstream(bedrock: tuple[str, Seen]) -> None:
    origin, seen = bedrock
    await asyncio.to_thread(_invoke, origin, ARN_MODEL)
    method, raw_path, headers, body = seen.requests[0]
    upstream = "https://bedrock-runtime.us-east-1.amazonaws.com"
    host = upstream.removeprefix("https://")
    moved = [(n, host if n.lower() == "host" else v) for n, v in headers]
    resigner = Resigner(REGION, Credentials(ACCESS_KEY, SECRET_KEY))
    signed = resigner.sign(method, upstream + raw_path, moved, body)
    assert _holds(method, upstream, raw_path, signed.headers, body)
    names = [n.lower() for n, _ in signed.headers]
    assert names.count("authorization") == 1 and names.count("x-amz-date") == 1


def test_no_credentials_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_CONFIG_FILE", f"{tmp_path}/none")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SigningError, match="needs AWS credentials"):
        Resigner(REGION)
