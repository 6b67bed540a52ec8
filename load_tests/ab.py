"""Two commits' proxies side by side, interleaved, against one lean upstream: what a change costs.

    .venv/bin/python load_tests/ab.py OLD_REV [NEW_REV] [--rounds 8] [--duration 3] [--workers 1]
        [--cells json:16,json:64,stream:1,stream:16]

Each revision is checked out into a temporary worktree and started as ``llmtally serve`` (its own
``config.toml``, ``--workers``) from this venv with ``PYTHONPATH`` on its ``src``; NEW_REV defaults to
the working tree. Every cell (non-streamed at 16 and 64 clients, streamed at 1 and 16, OpenAI) is
measured in rounds, each round measuring direct, old and new in turn (a disturbance of the machine then
lands in one round of one target), with samples pooled. It prints, per cell, the added p50 and p99 of
the latency (non-streamed) or of the first byte (streamed), and each target's CPU per call.

Numbers from different days or machines are not comparable: this machine's CPU per call moved by 1.6x
between two runs of the same code weeks apart. Compare revisions within one run, as this does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lean import Samples, build_request, closed_loop  # noqa: E402

CELLS = [("json", 16), ("json", 64), ("stream", 1), ("stream", 16)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, within_s: float = 30.0) -> None:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` and its children that are alive (clock ticks)."""
    total = 0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    pids = [pid, *(int(p) for p in children.stdout.split())]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "-f", "--detach", str(into), rev],
                   check=True, capture_output=True)  # fmt: skip
    return into


def start(src_root: Path, port: int, upstream: str, workers: int, work: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(src_root / "src"),
        "LLMTALLY_CONFIG": str(src_root / "config.toml"),
        "LLMTALLY_UPSTREAMS_OPENAI": upstream,
        "LLMTALLY_LOGGING_DESTINATION": str(work / f"records-{port}.jsonl"),
        "LLMTALLY_PIPELINE_SPILL_DIR": str(work / f"spill-{port}"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtally", "serve", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / f"serve-{port}.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    wait_for(port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new", nargs="?", default=None, help="default: the working tree")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cells", default=",".join(f"{m}:{c}" for m, c in CELLS),
                        help="mode:clients,... (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    cells = [(mode, int(clients)) for mode, clients in (c.split(":") for c in args.cells.split(","))]
    work = Path(tempfile.mkdtemp(prefix="llmtally-ab-"))
    trees = {"old": worktree(args.old, work / "old")}
    trees["new"] = worktree(args.new, work / "new") if args.new else HERE.parent
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "lean.py"), "upstream", "--port", str(up_port), "--latency-ms", "50"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        wait_for(up_port)
        ports = {"direct": up_port}
        for name, root in trees.items():
            ports[name] = free_port()
            procs[name] = start(root, ports[name], f"http://127.0.0.1:{up_port}", args.workers, work)
        print(f"old {args.old} · new {args.new or 'working tree'} · {args.workers} worker(s) · "
              f"{args.rounds} rounds of {args.duration:.0f} s", flush=True)  # fmt: skip
        for mode, clients in cells:
            pooled = {name: Samples() for name in ports}
            ticks = dict.fromkeys(ports, 0)
            for _ in range(args.rounds):
                for name, port in ports.items():
                    prefix = "" if name == "direct" else "/openai"
                    request = build_request("127.0.0.1", port, prefix, "openai", mode == "stream")
                    before = cpu_ticks(procs[name].pid) if name in procs else 0
                    loop = closed_loop("127.0.0.1", port, request, clients, args.duration, args.warmup)
                    got = asyncio.run(loop)
                    if name in procs:
                        ticks[name] += cpu_ticks(procs[name].pid) - before
                    pooled[name].latency_ms += got.latency_ms
                    pooled[name].ttfb_ms += got.ttfb_ms
                    pooled[name].errors += got.errors
            key = "latency_ms" if mode == "json" else "ttfb_ms"
            base = getattr(pooled["direct"], key)
            line = f"{mode:6} c={clients:<3}"
            for name in ("old", "new"):
                values = getattr(pooled[name], key)
                calls = len(pooled[name].latency_ms)
                per_call = ticks[name] * 1e6 / os.sysconf("SC_CLK_TCK") / max(calls, 1)
                line += (
                    f" | {name}: +{pct(values, 0.5) - pct(base, 0.5):.2f} p50"
                    f" +{pct(values, 0.99) - pct(base, 0.99):.2f} p99"
                    f" {per_call:.0f} us/call err {pooled[name].errors}"
                )
            print(line + f" | direct p50 {statistics.median(base):.2f}", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
        upstream.terminate()
        for root in trees.values():
            if root != HERE.parent:
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(root)],
                               capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
