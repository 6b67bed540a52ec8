"""The Bedrock stream's first byte through the proxy, beside OpenAI's, against one lean upstream.

    .venv/bin/python load_tests/bedrock_ttfb.py [--rounds 8] [--duration 3] [--workers 1]
        [--cells stream:1,stream:16] [--signing resign]

One ``llmtally serve`` (this working tree, its ``config.toml``) with the OpenAI and Bedrock upstreams
pointed at ``lean.py``'s upstream (50 ms to the head; Bedrock's canned answer is the test fake's
InvokeModelWithResponseStream event-stream body for Claude, its messages sent at the same cadence as
the SSE events). ``signing = "resign"`` (the default) drops the client's signature and signs every call
again with botocore for the upstream, with the fake's AWS keys in the environment; the lean upstream
checks no signature. Every round measures OpenAI direct, OpenAI through the proxy, Bedrock direct and
Bedrock through the proxy in turn, each for ``--duration`` s (a disturbance of the machine lands in one
round of one target); samples are pooled over rounds. Prints, per cell, the first byte's added p50 and
p99 over direct for each provider, and the proxy's CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ab import cpu_ticks, free_port, pct, wait_for  # noqa: E402
from lean import Samples, build_request, closed_loop  # noqa: E402

from llmtally.testing.fake_bedrock import ACCESS_KEY, REGION, SECRET_KEY  # noqa: E402

PREFIX = {"openai": "/openai", "bedrock": "/bedrock"}


def start_proxy(port: int, upstream: str, workers: int, signing: str, work: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LLMTALLY_CONFIG": str(HERE.parent / "config.toml"),
        "LLMTALLY_UPSTREAMS_OPENAI": upstream,
        "LLMTALLY_UPSTREAMS_BEDROCK": upstream,
        "LLMTALLY_BEDROCK_SIGNING": signing,
        "LLMTALLY_BEDROCK_REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "LLMTALLY_LOGGING_DESTINATION": str(work / "records.jsonl"),
        "LLMTALLY_PIPELINE_SPILL_DIR": str(work / "spill"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtally", "serve", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    wait_for(port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--signing",
        default="resign",
        help="resign, passthrough, or both: resign,passthrough "
        "(a proxy for each; OpenAI goes through the first)",
    )
    parser.add_argument(
        "--cells", default="stream:1,stream:16", help="mode:clients,... (default: %(default)s)"
    )
    parser.add_argument("--providers", default="openai,bedrock", help="default: %(default)s")
    parser.add_argument("--keep-work", action="store_true", help="keep the records and the proxy's log")
    args = parser.parse_args()
    cells = [(mode, int(clients)) for mode, clients in (c.split(":") for c in args.cells.split(","))]
    work = Path(tempfile.mkdtemp(prefix="llmtally-bedrock-ttfb-"))
    up_port = free_port()
    modes = args.signing.split(",")
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "lean.py"), "upstream", "--port", str(up_port), "--latency-ms", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proxies: dict[str, tuple[int, subprocess.Popen[bytes] | None]] = {}
    try:
        wait_for(up_port)
        for mode in modes:
            (work / mode).mkdir()
            port = free_port()
            proxies[mode] = (
                port,
                start_proxy(port, f"http://127.0.0.1:{up_port}", args.workers, mode, work / mode),
            )
        print(f"{args.workers} worker(s) · signing {args.signing} · {args.rounds} rounds of "
              f"{args.duration:.0f} s · {os.cpu_count()} cores", flush=True)  # fmt: skip
        providers = args.providers.split(",")
        targets = [
            (p, via) for p in providers for via in ("direct", *(modes if p == "bedrock" else modes[:1]))
        ]
        for kind, clients in cells:
            pooled = {t: Samples() for t in targets}
            ticks = dict.fromkeys(targets, 0)
            for _ in range(args.rounds):
                for provider, via in targets:
                    port, proc = proxies.get(via, (up_port, None))
                    prefix = "" if via == "direct" else PREFIX[provider]
                    request = build_request("127.0.0.1", port, prefix, provider, kind == "stream")
                    before = cpu_ticks(proc.pid) if proc else 0
                    loop = closed_loop("127.0.0.1", port, request, clients, args.duration, args.warmup)
                    got = asyncio.run(loop)
                    ticks[(provider, via)] += cpu_ticks(proc.pid) - before if proc else 0
                    sample = pooled[(provider, via)]
                    sample.latency_ms += got.latency_ms
                    sample.ttfb_ms += got.ttfb_ms
                    sample.errors += got.errors
            key = "ttfb_ms" if kind == "stream" else "latency_ms"
            line = f"{kind:6} c={clients:<3}"
            for provider, through in targets:
                if through == "direct":
                    continue
                base = getattr(pooled[(provider, "direct")], key)
                via_samples = pooled[(provider, through)]
                values = getattr(via_samples, key)
                calls = max(len(via_samples.latency_ms), 1)
                per_call = ticks[(provider, through)] * 1e6 / os.sysconf("SC_CLK_TCK") / calls
                name = provider if provider == "openai" or len(modes) == 1 else f"bedrock {through}"
                line += (
                    f" | {name}: +{pct(values, 0.5) - pct(base, 0.5):.2f} p50"
                    f" +{pct(values, 0.99) - pct(base, 0.99):.2f} p99 (direct {pct(base, 0.5):.2f}/"
                    f"{pct(base, 0.99):.2f}) {per_call:.0f} us/call n={len(values)} err {via_samples.errors}"
                )
            print(line, flush=True)
    finally:
        running = [proc for _, proc in proxies.values() if proc is not None]
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait(30)
        upstream.terminate()
        if args.keep_work:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
