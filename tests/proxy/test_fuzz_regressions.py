"""Inputs the socket fuzzers found (tests/proxy/test_fuzz_*.py), kept as fixed raw-bytes cases."""

from __future__ import annotations

import logging

import pytest

from tests.proxy.campaign_helpers import (
    FAST_PATHS,
    assert_no_tracebacks,
    chat_completion,
    exchange,
    one_proxy,
    port_of,
    post,
    raw_upstream,
    respond_with,
)

BODY = chat_completion()


@FAST_PATHS
@pytest.mark.parametrize("reason", [b"\x00hatever", b"O\x01K", b"OK\x7f"])
async def test_a_reason_phrase_with_control_bytes_is_not_passed_on(
    fast_path: bool, reason: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # The aiohttp path refused to write such a status line (an ERROR traceback, the client cut off);
    # the fast path passed the control byte on to the client's status line.
    answer = b"HTTP/1.1 200 %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        reason, len(BODY), BODY,
    )  # fmt: skip
    caplog.set_level(logging.DEBUG)
    async with raw_upstream(respond_with(answer)) as upstream, one_proxy(upstream.url, fast_path) as proxy:
        verdict = await exchange(port_of(proxy.url), [post()])
        await proxy.flush()
    assert [(a.status, a.body) for a in verdict.answers] == [(200, BODY)]
    status_line = verdict.raw.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 200 OK", status_line
    assert_no_tracebacks(caplog)


@FAST_PATHS
async def test_a_passthrough_reason_phrase_with_control_bytes_is_not_passed_on(
    fast_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    answer = b"HTTP/1.1 200 \x00hatever\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    caplog.set_level(logging.DEBUG)
    async with raw_upstream(respond_with(answer)) as upstream, one_proxy(upstream.url, fast_path) as proxy:
        verdict = await exchange(
            port_of(proxy.url), [b"GET /openai/v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n"]
        )
    assert [(a.status, a.body) for a in verdict.answers] == [(200, b"{}")]
    assert_no_tracebacks(caplog)
