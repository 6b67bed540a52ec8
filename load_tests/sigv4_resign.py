"""Cost of re-signing one Bedrock call (issue 28 asks for ≤ 0.2 ms): prints µs per call.

.venv/bin/python load_tests/sigv4_resign.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import json
import time

from botocore.credentials import Credentials

from llmtally.platforms.sigv4 import Resigner

URL = (
    "https://bedrock-runtime.us-east-1.amazonaws.com/model/"
    "us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke-with-response-stream"
)
HEADERS = [
    ("Host", "bedrock-runtime.us-east-1.amazonaws.com"),
    ("Content-Type", "application/json"),
    ("Accept", "application/vnd.amazon.eventstream"),
    ("User-Agent", "Boto3/1.40 md/Botocore#1.40 ua/2.1 os/linux"),
    ("Authorization", "AWS4-HMAC-SHA256 Credential=AKID/20261207/us-east-1/bedrock/aws4_request, ..."),
    ("X-Amz-Date", "20261207T000000Z"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--body-kb", type=int, default=4, help="request body size")
    args = parser.parse_args()
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (args.body_kb * 1024)}]}).encode()
    resigner = Resigner("us-east-1", Credentials("AKIDBENCH", "secret-bench", "session-token"))
    for _ in range(500):  # warm-up
        resigner.sign("POST", URL, HEADERS, body)
    start = time.perf_counter()
    for _ in range(args.calls):
        resigner.sign("POST", URL, HEADERS, body)
    per_call_us = (time.perf_counter() - start) / args.calls * 1e6
    print(f"re-sign, {args.body_kb} KiB body: {per_call_us:.1f} µs per call ({args.calls} calls)")


if __name__ == "__main__":
    main()
