"""What a spend-limit check costs a call: the same proxy without budgets, with the memory store, and
with a Redis store on loopback, side by side against one lean upstream.

    .venv/bin/python load_tests/budget_cost.py [--rounds 6] [--duration 3] [--workers 1]
        [--cells json:16,stream:16]

Every target is ``llmtally serve`` from this working tree with the same config except ``[budgets]``:
``plain`` has none; ``memory`` and ``redis`` have one rule (one budget per tenant, a limit no run
reaches, so every call is checked, reserved and settled and none refused). Each request carries the
tenant tag. Rounds interleave direct, plain, memory and redis (a disturbance lands in one round of one
target) and samples are pooled; it prints per cell the added p50 and p99 over direct (latency for
non-streamed calls, first byte for streams), each target's CPU per call (proxy processes; Redis's
own CPU per call on the redis line), and the difference a check makes over ``plain``. The Redis
server is the one the test suite uses (llmtally.testing.redis_server).
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

from llmtally.testing.redis_server import RedisServer  # noqa: E402

RULE = '[[budgets.rules]]\nname = "per-tenant"\nmatch = { tag = "tenant" }\nlimit_usd = "9000000"\n'


def start(
    name: str, port: int, upstream: str, workers: int, work: Path, store: str | None
) -> subprocess.Popen[bytes]:
    config = work / f"{name}.toml"
    text = without_budgets((HERE.parent / "config.toml").read_text())
    if store is not None:
        text += f'\n[budgets]\nstore = "{store}"\n{RULE}'
    config.write_text(text)
    env = {
        **os.environ,
        "LLMTALLY_UPSTREAMS_OPENAI": upstream,
        "LLMTALLY_LOGGING_DESTINATION": str(work / f"records-{name}.jsonl"),
        "LLMTALLY_PIPELINE_SPILL_DIR": str(work / f"spill-{name}"),
    }
    log = (work / f"serve-{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtally", "serve", "--config", str(config), "--port", str(port),
         "--workers", str(workers)],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    log.close()
    wait_for(port)
    return proc


def without_budgets(text: str) -> str:
    """config.toml without its [budgets] tables (each target gets its own)."""
    kept, inside = [], False
    for line in text.splitlines(keepends=True):
        head = line.strip()
        if head.startswith("["):
            inside = head.startswith(("[budgets]", "[budgets.", "[[budgets."))
        if not inside:
            kept.append(line)
    return "".join(kept)


def tagged(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    return head + b"\r\nx-llmtally-tag-tenant: acme\r\n\r\n" + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cells", default="json:16,stream:16", help="mode:clients,... (%(default)s)")
    args = parser.parse_args()
    cells = [(mode, int(clients)) for mode, clients in (c.split(":") for c in args.cells.split(","))]
    work = Path(tempfile.mkdtemp(prefix="llmtally-budget-cost-"))
    redis_server = RedisServer()
    redis_server.start()
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "lean.py"), "upstream", "--port", str(up_port), "--latency-ms", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        wait_for(up_port)
        ports = {"direct": up_port}
        for name, store in (("plain", None), ("memory", "memory"), ("redis", redis_server.url)):
            ports[name] = free_port()
            procs[name] = start(name, ports[name], f"http://127.0.0.1:{up_port}", args.workers, work, store)
        assert redis_server.process is not None
        print(f"{args.workers} worker(s) · {args.rounds} rounds of {args.duration:.0f} s · redis "
              f"{redis_server.binary}", flush=True)  # fmt: skip
        for mode, clients in cells:
            pooled = {name: Samples() for name in ports}
            ticks = dict.fromkeys(ports, 0)
            redis_ticks = 0
            for _ in range(args.rounds):
                for name, port in ports.items():
                    prefix = "" if name == "direct" else "/openai"
                    request = tagged(build_request("127.0.0.1", port, prefix, "openai", mode == "stream"))
                    before = cpu_ticks(procs[name].pid) if name in procs else 0
                    redis_before = cpu_ticks(redis_server.process.pid)
                    loop = closed_loop("127.0.0.1", port, request, clients, args.duration, args.warmup)
                    got = asyncio.run(loop)
                    if name in procs:
                        ticks[name] += cpu_ticks(procs[name].pid) - before
                    if name == "redis":
                        redis_ticks += cpu_ticks(redis_server.process.pid) - redis_before
                    pooled[name].latency_ms += got.latency_ms
                    pooled[name].ttfb_ms += got.ttfb_ms
                    pooled[name].errors += got.errors
            key = "latency_ms" if mode == "json" else "ttfb_ms"
            base = getattr(pooled["direct"], key)
            tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
            added: dict[str, tuple[float, float]] = {}
            print(f"{mode} c={clients}: direct p50 {pct(base, 0.5):.2f} ms p99 {pct(base, 0.99):.2f} ms")
            for name in ("plain", "memory", "redis"):
                values = getattr(pooled[name], key)
                calls = max(len(pooled[name].latency_ms), 1)
                added[name] = (pct(values, 0.5) - pct(base, 0.5), pct(values, 0.99) - pct(base, 0.99))
                extra = ""
                if name == "redis":
                    extra = f", redis-server {redis_ticks * tick_us / calls:.0f} us/call"
                over = ""
                if name != "plain":
                    over = (f" | check: +{added[name][0] - added['plain'][0]:.2f} p50"
                            f" +{added[name][1] - added['plain'][1]:.2f} p99 over plain")  # fmt: skip
                print(f"  {name:7} +{added[name][0]:.2f} p50 +{added[name][1]:.2f} p99 ms, "
                      f"{ticks[name] * tick_us / calls:.0f} us/call{extra}, {calls} calls, "
                      f"err {pooled[name].errors}{over}", flush=True)  # fmt: skip
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
        upstream.terminate()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
