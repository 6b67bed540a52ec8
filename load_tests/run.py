"""Proxy overhead, side by side: direct calls, llmtally, nginx and LiteLLM's proxy, one upstream.

    .venv/bin/python load_tests/run.py [--duration 3] [--rounds 3] [--p99-rounds 12]
        [--concurrency 1,16,64,256] [--samples-out FILE]

Starts the lean fake upstream (load_tests/lean.py: canned bytes in each provider's wire format after a
fixed delay; streams at a fixed cadence), llmtally (``llmtally serve``, 1 and 2 proxy workers), Debian's
nginx (``proxy_pass``, buffering off, keep-alive; when installed) and LiteLLM's proxy (its pass-through
routes; from load_tests/.venv-litellm, which ``make load`` creates) as separate processes. Against the
same upstream, in the same run, it drives each target at fixed concurrency and at fixed offered
rates, non-streamed and streamed, for each provider, after a warm-up; each cell in ``--rounds``
interleaved rounds (every target once per round) whose samples are pooled, and the cells whose p99 is
held to the 2 ms target (16 clients, non-streamed) in ``--p99-rounds``. It prints a table and writes
load_tests/results/<date>.json and a PNG chart. "Added" is a target's value minus the direct call's
in the same cell. CPU and peak RSS count every process of a target (llmtally's workers included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from lean import Samples, build_request, closed_loop, open_loop

HERE = Path(__file__).resolve().parent
PROVIDERS = ("openai", "anthropic", "gemini")
#: (mode, load) of the cells whose p99 is held to 2 ms: they get --p99-rounds (see rounds_for).
STRICT_P99_CELL = ("json", "c=16")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing listening on port {port} after {within_s:.0f} s")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Result:
    target: str
    provider: str
    mode: str
    load: str  # "c=16" (closed loop) or "r=200" (offered requests/s)
    requests: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    ttfb_p50_ms: float | None = None
    chunk_gap_p50_ms: float | None = None
    overhead_header_p50_ms: float | None = None
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    #: How long the load generator and the upstream each waited for a CPU per wake-up in this cell
    #: (µs): the machine's scheduling, counted in every latency above (see docs/performance.md).
    loadgen_cpu_wait_us: float | None = None
    upstream_cpu_wait_us: float | None = None
    #: CPU seconds the rest of the machine used during the cell (every process but the target, the
    #: load generator and the upstream: idle targets, the system), and what the hypervisor stole.
    other_cpu_s: float | None = None
    steal_s: float | None = None
    #: Times per answered call the target's processes were switched out while still runnable (another
    #: process took their CPU). A proxy preempted in a burst of calls keeps the rest of the burst
    #: waiting: the 1-worker 16-client p99 goes with it (see docs/performance.md).
    preempted_per_call: float | None = None
    #: The p99 of each round on its own: how far apart the rounds were.
    round_p99_ms: list[float] = field(default_factory=list)
    added: dict[str, float] = field(default_factory=dict)


class Proc:
    """A target's process (and, through /proc, its children)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready: bytes | None = None,
                 cwd: str | None = None, timeout: float = 120) -> None:  # fmt: skip
        self.popen = subprocess.Popen(
            args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True,
        )  # fmt: skip
        if ready is not None:
            assert self.popen.stdout is not None
            deadline = time.monotonic() + timeout
            said: list[bytes] = []
            while ready not in (line := self.popen.stdout.readline()):
                said = [*said[-4:], line]
                if not line or time.monotonic() > deadline:
                    self.stop()
                    last = b"".join(said).decode(errors="replace").strip() or "(nothing)"
                    raise RuntimeError(
                        f"{' '.join(args[:4])} did not start (exit {self.popen.poll()}); it said:\n{last}"
                    )
        # Keep draining its output so a chatty target never blocks on a full pipe.
        if self.popen.stdout is not None:
            import threading

            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for _ in self.popen.stdout:
            pass

    def pids(self) -> list[int]:
        found, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return found

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def preemptions(self) -> int:
        """Involuntary context switches so far, over every thread of every process."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    status = (task / "status").read_text()
                    total += int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        return total

    def _status_mb(self, key: str) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if key in status:
                total += int(status.split(key)[1].split()[0]) / 1024
        return total

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS:")

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM:")

    def pss_mb(self) -> float:
        """Proportional set size over the processes: a page shared by n processes counts 1/n in each.

        Summed RSS counts the interpreter and the libraries every process maps once per process;
        the sum of PSS counts them once, as a container's memory accounting does (roughly: it also
        charges kernel memory such as socket buffers, which neither figure holds).
        """
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += int(rollup.split("\nPss:")[1].split()[0]) / 1024
        return total

    def sched(self) -> tuple[int, int] | None:
        return sched_counters(self.popen.pid)

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            self.popen.kill()


@dataclass
class CellTally:
    """One target's samples and counters in one cell, summed over the cell's rounds."""

    samples: Samples = field(default_factory=Samples)
    round_p99_ms: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    preempted: int | None = None
    loadgen_sched: list[int] = field(default_factory=lambda: [0, 0])
    upstream_sched: list[int] = field(default_factory=lambda: [0, 0])
    other_cpu_s: float = 0.0
    steal_s: float = 0.0

    def measure(
        self, port: int, prefix: str, proc: Proc | None, upstream: Proc, provider: str, mode: str, load: str,
        args: argparse.Namespace,
    ) -> Samples:  # fmt: skip
        """Measure one round; its samples are pooled here and returned."""
        cpu0 = proc.cpu_s() if proc else None
        preempted0 = proc.preemptions() if proc else None
        gen0, up0 = sched_counters(os.getpid()), upstream.sched()
        machine0, own0, upstream0 = machine_cpu(), time.process_time(), upstream.cpu_s()
        got = uvloop.run(run_cell(port, prefix, provider, mode, load, args))
        machine1 = machine_cpu()
        harness = time.process_time() - own0 + upstream.cpu_s() - upstream0
        _add_sched(self.loadgen_sched, gen0, sched_counters(os.getpid()))
        _add_sched(self.upstream_sched, up0, upstream.sched())
        used = 0.0
        if proc is not None and cpu0 is not None:
            used = proc.cpu_s() - cpu0
            self.cpu_s = (self.cpu_s or 0.0) + used
            self.peak_rss_mb = proc.peak_rss_mb()
        if proc is not None and preempted0 is not None:
            self.preempted = (self.preempted or 0) + proc.preemptions() - preempted0
        self.other_cpu_s += machine1[0] - machine0[0] - harness - used
        self.steal_s += machine1[1] - machine0[1]
        p99 = pct(got.latency_ms, 0.99)
        if p99 is not None:
            self.round_p99_ms.append(p99)
        pooled = self.samples
        pooled.latency_ms += got.latency_ms
        pooled.ttfb_ms += got.ttfb_ms
        pooled.gap_ms += got.gap_ms
        pooled.overhead_ms += got.overhead_ms
        pooled.errors += got.errors
        return got

    def result(self, name: str, provider: str, mode: str, load: str, seconds: float) -> Result:
        result = summarise(name, provider, mode, load, self.samples, seconds)
        result.round_p99_ms = self.round_p99_ms
        result.cpu_s, result.peak_rss_mb = self.cpu_s, self.peak_rss_mb
        result.loadgen_cpu_wait_us = _wait_us(self.loadgen_sched)
        result.upstream_cpu_wait_us = _wait_us(self.upstream_sched)
        result.other_cpu_s, result.steal_s = self.other_cpu_s, self.steal_s
        if self.preempted is not None and result.requests:
            result.preempted_per_call = self.preempted / result.requests
        return result


def _add_sched(total: list[int], before: tuple[int, int] | None, after: tuple[int, int] | None) -> None:
    if before is not None and after is not None:
        total[0] += after[0] - before[0]
        total[1] += after[1] - before[1]


def _wait_us(total: list[int]) -> float | None:
    """Mean wait for a CPU per wake-up, in µs, from summed sched_counters() differences."""
    return total[0] / total[1] / 1000 if total[1] > 0 else None


NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/(openai|anthropic|gemini)/ {{
      rewrite ^/[a-z]+(/.*)$ $1 break;
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""

LITELLM_CONF = "general_settings:\n  pass_through_endpoints:\n" + "".join(
    f'    - path: "/pt/{p}"\n      target: "{{upstream}}"\n      include_subpath: true\n' for p in PROVIDERS
)


def start_targets(
    args: argparse.Namespace, work: Path, upstream_port: int
) -> dict[str, tuple[int, str, Proc | None]]:
    """name → (port, path prefix before /<provider>, process); if one fails to start, none is left running."""
    targets: dict[str, tuple[int, str, Proc | None]] = {"direct": (upstream_port, "", None)}
    try:
        _start_targets(args, work, upstream_port, targets)
    except BaseException:
        for _, _, proc in targets.values():
            if proc is not None:
                proc.stop()
        raise
    return targets


def _start_targets(
    args: argparse.Namespace, work: Path, upstream_port: int, targets: dict[str, tuple[int, str, Proc | None]]
) -> None:
    up = f"http://127.0.0.1:{upstream_port}"
    for workers in args.llmtally_workers:
        port = free_port()
        proc = Proc(
            [sys.executable, "-m", "llmtally", "serve", "--port", str(port), "--workers", str(workers)],
            env={
                "LLMTALLY_UPSTREAMS_OPENAI": up, "LLMTALLY_UPSTREAMS_ANTHROPIC": up,
                "LLMTALLY_UPSTREAMS_GEMINI": up, "LLMTALLY_CONFIG": str(HERE.parent / "config.toml"),
                "LLMTALLY_LOGGING_DESTINATION": str(work / f"records-{workers}w.jsonl"),
                "LLMTALLY_PIPELINE_SPILL_DIR": str(work / f"spill-{workers}w"),
            },
            ready=b"listening on",
        )  # fmt: skip
        targets[f"llmtally-{workers}w"] = (port, "/{provider}", proc)
    if args.floor:
        port = free_port()
        proc = Proc([sys.executable, str(HERE / "floor.py"), "--port", str(port),
                     "--upstream-port", str(upstream_port)], ready=b"floor proxy listening")  # fmt: skip
        targets["python-floor"] = (port, "/{provider}", proc)
    nginx_bin = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx_bin and not args.no_nginx:
        port = free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, upstream_port=upstream_port, port=port))
        proc = Proc([nginx_bin, "-p", str(work), "-c", str(work / "nginx.conf"), "-g", "daemon off;"])
        time.sleep(1)
        targets["nginx"] = (port, "/{provider}", proc)
    else:
        print("nginx: off or not installed (apt-get install nginx-light); skipped", flush=True)
    litellm = Path(args.litellm_bin)
    if litellm.exists() and not args.no_litellm:
        port = free_port()
        (work / "litellm.yaml").write_text(LITELLM_CONF.format(upstream=up))
        proc = Proc(
            [str(litellm), "--config", str(work / "litellm.yaml"), "--port", str(port), "--num_workers", "1"],
            env={"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",  # loopback load test only
                 "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            cwd=str(work),
        )  # fmt: skip
        wait_for_port(port, 120)
        targets["litellm"] = (port, "/pt/{provider}", proc)
    else:
        why = "off (--no-litellm)" if args.no_litellm else f"{litellm} not found (make load installs it)"
        print(f"LiteLLM: {why}; skipped", flush=True)


def settle(procs: list[Proc], within_s: float = 30.0) -> None:
    """Wait until every process is idle: a target still working off the last cell's backlog
    (LiteLLM, past saturation) would otherwise take the CPU from the next target's measurement."""
    start = time.monotonic()
    while time.monotonic() < start + within_s:
        before = {id(p): p.cpu_s() for p in procs}
        time.sleep(0.5)
        busy = [p for p in procs if p.cpu_s() - before[id(p)] > 0.05]  # >10 % of a core
        if not busy:
            return
    print(f"  (still busy after {within_s:.0f} s: {[p.popen.args[:3] for p in busy]})", flush=True)


def sched_counters(pid: int) -> tuple[int, int] | None:
    """(ns spent runnable but waiting for a CPU, times scheduled) over a process's threads, from
    /proc/<pid>/task/*/schedstat; None where the kernel does not keep them."""
    wait = slices = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            _, waited, scheduled = (int(v) for v in (task / "schedstat").read_text().split())
            wait, slices = wait + waited, slices + scheduled
    except (OSError, ValueError):
        return None
    return wait, slices


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, of them stolen by the hypervisor)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def summarise(name: str, provider: str, mode: str, load: str, s: Samples, duration: float) -> Result:
    return Result(
        name, provider, mode, load,
        requests=len(s.latency_ms), errors=s.errors, rps=len(s.latency_ms) / duration,
        p50_ms=pct(s.latency_ms, 0.5), p95_ms=pct(s.latency_ms, 0.95), p99_ms=pct(s.latency_ms, 0.99),
        ttfb_p50_ms=pct(s.ttfb_ms, 0.5) if mode == "stream" else None,
        chunk_gap_p50_ms=pct(s.gap_ms, 0.5) if mode == "stream" else None,
        overhead_header_p50_ms=pct(s.overhead_ms, 0.5),
    )  # fmt: skip


def added(result: Result, base: Result) -> dict[str, float]:
    out = {}
    for key in ("p50_ms", "p95_ms", "p99_ms", "ttfb_p50_ms", "chunk_gap_p50_ms"):
        mine, theirs = getattr(result, key), getattr(base, key)
        if mine is not None and theirs is not None:
            out[key] = mine - theirs
    if base.rps:
        out["rps_ratio"] = result.rps / base.rps
    return out


def cells(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(provider, mode, load) in run order: for each provider and mode (non-streamed, streamed), every
    concurrency, then every offered rate."""
    loads = [f"c={c}" for c in args.concurrency] + [f"r={r}" for r in args.rates]
    return [(provider, mode, load) for provider in args.providers for mode in args.modes for load in loads]


def rounds_for(args: argparse.Namespace, mode: str, load: str) -> int:
    """Rounds for a cell. The 16-client non-streamed p99 is judged against 2 ms, and 3 rounds do not
    pin it down: calls come in bursts of 16, so a round's tail is a few disturbed bursts, and in a
    12-round run, pooling 3 of its rounds at random put nginx's added p99 anywhere from +0.09 to
    +2.32 ms (5th to 95th percentile; docs/performance.md, "How many rounds a p99 needs")."""
    return int(args.p99_rounds if (mode, load) == STRICT_P99_CELL else args.rounds)


async def run_cell(
    port: int, prefix: str, provider: str, mode: str, load: str, args: argparse.Namespace
) -> Samples:
    request = build_request("127.0.0.1", port, prefix.format(provider=provider), provider, mode == "stream")
    kind, value = load.split("=")
    if kind == "c":
        return await closed_loop("127.0.0.1", port, request, int(value), args.duration, args.warmup)
    return await open_loop("127.0.0.1", port, request, float(value), args.duration, args.warmup)


class MemoryCgroup:
    """A memory cgroup (v1) of its own for the proxy: the memory a container limit would see.

    Summed RSS counts every page shared by the proxy's processes (the interpreter, the libraries)
    once per process. A Kubernetes memory limit is checked against the container's cgroup, which
    charges each page once (plus kernel memory such as socket buffers); the kubelet's "working set"
    is its usage less the inactive file cache. Needs a writable cgroup v1 memory hierarchy (root);
    :meth:`make` returns None where there is none, and the run goes on without this figure.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls) -> MemoryCgroup | None:
        with contextlib.suppress(OSError, IndexError, StopIteration):  # no (writable) v1 memory hierarchy
            own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                       if line.split(":")[1] == "memory")  # fmt: skip
            path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"llmtally-load-{os.getpid()}"
            path.mkdir()
            return cls(path)
        return None

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside the cgroup (and so are the processes they start)."""
        return ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "sh", *args]

    def working_set_mb(self) -> float:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        usage = int((self.path / "memory.usage_in_bytes").read_text())
        return (usage - int(stat.get("total_inactive_file", 0))) / 2**20

    def remove(self) -> None:
        for _ in range(50):  # its processes take a moment to leave once they exited
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _held_line(m: dict[str, float | None], how: str) -> str:
    def mb(key: str) -> str:
        value = m.get(key)
        return "n/a" if value is None else f"{value:.0f}"

    return (
        f"\n{mb('streams')} streams open at once, after a few calls of each provider, llmtally {how}: "
        f"RSS {mb('rss_mb')} MB, PSS {mb('pss_mb')} MB (all processes), cgroup working set "
        f"{mb('working_set_mb')} MB ({mb('fresh_rss_mb')}, {mb('fresh_pss_mb')} and "
        f"{mb('fresh_working_set_mb')} MB idle and fresh); after one estimated call "
        f"({mb('estimated_records')} estimated records so far): RSS {mb('rss_mb_after_estimate')}, "
        f"PSS {mb('pss_mb_after_estimate')}, working set {mb('working_set_mb_after_estimate')} MB"
    )


def hold_streams(work: Path, slow_port: int, count: int, workers: int | None) -> dict[str, float | None]:
    """Start ``llmtally serve`` against the slow upstream (with ``workers``, or as configured) and
    measure it holding ``count`` streams (:func:`open_streams`)."""
    port = free_port()
    env = {f"LLMTALLY_UPSTREAMS_{p.upper()}": f"http://127.0.0.1:{slow_port}" for p in PROVIDERS}
    name = "default" if workers is None else f"{workers}w"
    records = work / f"slow-records-{name}.jsonl"
    env |= {"LLMTALLY_LOGGING_DESTINATION": str(records),
            "LLMTALLY_PIPELINE_SPILL_DIR": str(work / f"slow-spill-{name}")}  # fmt: skip
    if workers is not None:
        env["LLMTALLY_SERVER_WORKERS"] = str(workers)
    cgroup = MemoryCgroup.make()
    command = [sys.executable, "-m", "llmtally", "serve", "--port", str(port)]
    proxy = Proc(cgroup.command(command) if cgroup else command, env=env, ready=b"listening on")
    try:
        return uvloop.run(open_streams(port, count, proxy, cgroup, records))
    finally:
        proxy.stop()
        if cgroup is not None:
            cgroup.remove()


async def open_streams(
    port: int, count: int, proc: Proc, cgroup: MemoryCgroup | None, records: Path
) -> dict[str, float | None]:
    """Hold ``count`` streams open at once (the upstream sends slowly); the proxy's memory meanwhile.

    Measured after a few calls of each provider, as a proxy in service would be (a fresh proxy's,
    idle, is kept as ``fresh_*``). Then one client leaves mid-stream: with no usage from the
    provider its record is estimated, so the record process loads ``o200k_base`` (~46 MB), which it
    keeps; the memory is measured again with the other streams still open (``*_after_estimate``).
    Summed RSS and PSS over the processes, and the working set of the proxy's own memory cgroup
    when one can be made (:class:`MemoryCgroup`; else None). ``records``: the proxy's record log,
    where the estimated record is checked for.
    """
    from lean import ClientConnection, _connect

    def working_set() -> float | None:
        return cgroup.working_set_mb() if cgroup is not None else None

    fresh, fresh_pss, fresh_ws = proc.rss_mb(), proc.pss_mb(), working_set()
    for provider in PROVIDERS:
        warm = build_request("127.0.0.1", port, f"/{provider}", provider, False)
        await closed_loop("127.0.0.1", port, warm, 1, 0.2, 0.0)
    await asyncio.sleep(3.0)  # the record process builds those records (and loads what they need)
    request = build_request("127.0.0.1", port, "/openai", "openai", True)
    conns: list[ClientConnection] = []
    for _ in range(count):
        conn = await _connect("127.0.0.1", port)
        conns.append(conn)
        assert conn.transport is not None
        conn.transport.write(request)
    deadline = time.monotonic() + 60
    while sum(c.first is not None for c in conns) < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # polls many connections' first byte; an Event each would be noise
    # A stream counts once its 200 head and first event arrived (an error answer has a body too).
    opened = sum(c.first is not None and c.parser.get_status_code() == 200 for c in conns)
    measured = {"streams": opened, "rss_mb": proc.rss_mb(), "pss_mb": proc.pss_mb(),
                "working_set_mb": working_set(), "fresh_rss_mb": fresh, "fresh_pss_mb": fresh_pss,
                "fresh_working_set_mb": fresh_ws}  # fmt: skip
    if conns and conns[0].transport is not None:
        conns[0].transport.close()  # a client leaves mid-stream
        await asyncio.sleep(4.0)  # its record is estimated (and the tokenizer loaded for it)
        text = await asyncio.to_thread(lambda: records.read_text() if records.exists() else "")
        measured |= {"rss_mb_after_estimate": proc.rss_mb(), "pss_mb_after_estimate": proc.pss_mb(),
                     "working_set_mb_after_estimate": working_set(),
                     "estimated_records": text.count('"usage_source":"estimated"')}  # fmt: skip
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per target per round")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="rounds per cell: every target is measured once per round, in turn; samples are pooled",
    )  # fmt: skip
    parser.add_argument(
        "--p99-rounds", type=int, default=12,
        help="rounds for the cells whose p99 is judged against 2 ms (16 clients, non-streamed)",
    )  # fmt: skip
    parser.add_argument(
        "--samples-out", help="also write each round's latencies per target here (JSON lines; "
        "load_tests/p99_spread.py reads them)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--rates", default="200,800", help="offered requests/s (open loop); empty: none")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default="json,stream", help="json (non-streamed), stream, or both")
    parser.add_argument("--llmtally-workers", default="1,2", help="llmtally targets by proxy worker count")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="fake upstream delay before headers")
    parser.add_argument("--chunks", type=int, default=20, help="text events per stream")
    parser.add_argument("--chunk-interval-ms", type=float, default=5.0)
    parser.add_argument("--piece-chars", type=int, default=0, help="characters per text piece (body size)")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument(
        "--floor", action="store_true", help="also measure load_tests/floor.py (a bare uvloop+llhttp hop)"
    )
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--litellm-bin", default=str(HERE / ".venv-litellm" / "bin" / "litellm"))
    parser.add_argument("--open-streams", type=int, default=1000, help="streams held open at once (0: skip)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--keep-work", action="store_true",
        help="keep the run's work dir (records, nginx and LiteLLM configs); kept anyway if the run fails",
    )  # fmt: skip
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.providers = [p for p in args.providers.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    if unknown := set(args.modes) - {"json", "stream"}:
        parser.error(f"unknown --modes {sorted(unknown)}: use json, stream or both")
    if unknown := set(args.providers) - set(PROVIDERS):
        parser.error(f"unknown --providers {sorted(unknown)}: use {', '.join(PROVIDERS)}")
    args.llmtally_workers = [int(w) for w in args.llmtally_workers.split(",") if w]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The records of a full run take ~600 MB: the dir goes once the run has counted them.
    work = Path(tempfile.mkdtemp(prefix="llmtally-load-"))
    try:
        run(args, work)
    except BaseException:
        print(f"the run's records and configs are kept in {work}", file=sys.stderr)
        raise
    if args.keep_work:
        print(f"the run's records and configs are kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Measure every cell, then judge, print and write the results (``work``: scratch space)."""
    upstream_port = free_port()
    lean = [sys.executable, str(HERE / "lean.py"), "upstream", "--chunks", str(args.chunks),
            "--piece-chars", str(args.piece_chars)]  # fmt: skip
    upstream = Proc(
        [*lean, "--port", str(upstream_port), "--latency-ms", str(args.latency_ms),
         "--chunk-interval-ms", str(args.chunk_interval_ms)],
        ready=b"lean upstream on",
    )  # fmt: skip
    try:
        targets = start_targets(args, work, upstream_port)
    except BaseException:
        upstream.stop()  # a target that cannot start (say, a bad config.toml) must not leave it running
        raise
    results: list[Result] = []
    samples_out = open(args.samples_out, "w") if args.samples_out else None  # noqa: SIM115 (closed below)
    held: dict[str, float | None] = {}
    held_more: dict[str, dict[str, float | None]] = {}
    try:
        for provider, mode, load in cells(args):
            tallies = {name: CellTally() for name in targets}
            # Every target is measured in each round before any is measured again: a disturbance
            # of a few seconds (the machine, a slow cell) then lands in one round of one target,
            # a third of its samples, rather than in all of them.
            rounds = rounds_for(args, mode, load)
            for _ in range(rounds):
                for name, (port, prefix, proc) in targets.items():
                    settle([p for _, _, p in targets.values() if p is not None] + [upstream])
                    got = tallies[name].measure(port, prefix, proc, upstream, provider, mode, load, args)
                    if samples_out is not None:
                        line = {"target": name, "provider": provider, "mode": mode, "load": load,
                                "latency_ms": [round(x, 3) for x in got.latency_ms]}  # fmt: skip
                        samples_out.write(json.dumps(line) + "\n")
            base = None
            for name, tally in tallies.items():
                result = tally.result(name, provider, mode, load, args.duration * rounds)
                if name == "direct":
                    base = result
                elif base is not None:
                    result.added = added(result, base)
                results.append(result)
                print(_row(result), flush=True)
        if args.open_streams:
            # A second, slow upstream: each stream stays open for the whole test.
            slow_port = free_port()
            slow = Proc([*lean, "--port", str(slow_port), "--latency-ms", "0",
                         "--chunk-interval-ms", "60000"], ready=b"lean upstream on")  # fmt: skip
            try:
                # `llmtally serve` as configured by default (judged), then with each other worker
                # count measured above (for comparison: what a second worker costs).
                for workers in [None, *(w for w in args.llmtally_workers if w != 1)]:
                    measured = hold_streams(work, slow_port, args.open_streams, workers)
                    if workers is None:
                        held = measured
                    else:
                        held_more[f"{workers}w"] = measured
                    how = "as configured" if workers is None else f"with {workers} workers"
                    print(_held_line(measured, how))
            finally:
                slow.stop()
    finally:
        if samples_out is not None:
            samples_out.close()
        for _, _, proc in targets.values():
            if proc is not None:
                proc.stop()
        upstream.stop()
    records = {}
    for workers in args.llmtally_workers:
        path = work / f"records-{workers}w.jsonl"
        written = sum(1 for _ in path.open()) if path.exists() else 0
        answered = sum(r.requests + r.errors for r in results if r.target == f"llmtally-{workers}w")
        records[f"llmtally-{workers}w"] = {"records": written, "measured_requests": answered}
        print(f"llmtally-{workers}w records written: {written} (measured requests {answered}, plus warm-ups)")
    targets = check_targets(results, held, records)
    print("\ntargets (issue 5), judged from this run:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {t['target']:24s} {t['what']:40s} {value:>8s} (limit {t['limit']}) {verdict}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.now(UTC):%Y-%m-%d}"
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}
    report = {"machine": machine, "args": vars(args), "records": records, "open_streams": held,
              "open_streams_by_workers": held_more,
              "targets": targets, "results": [asdict(r) for r in results]}  # fmt: skip
    (out_dir / f"{stamp}.json").write_text(json.dumps(report, indent=2))
    chart(results, out_dir / f"{stamp}.png")
    print(f"results: {out_dir / stamp}.json and .png")


def check_targets(
    results: list[Result], held: dict[str, float | None], records: dict[str, dict[str, int]]
) -> list[dict[str, object]]:
    """Issue 5's targets, judged from this run: one row per target and llmtally worker count.

    Latency targets take the worst cell over the providers; SSE targets the worst streamed cell at
    1 and 16 clients, and again at 64; throughput against LiteLLM and nginx the lowest ratio over
    the providers and modes where all are saturated (the highest concurrency measured), since at 16
    clients a 50 ms upstream caps any proxy's requests/s near direct's, 2x LiteLLM's at most.
    """

    def cells(target: str, mode: str, load: str) -> list[Result]:
        return [r for r in results if r.target == target and r.mode == mode and r.load == load]

    def worst(target: str, mode: str, loads: tuple[str, ...], key: str) -> float | None:
        values = [r.added[key] for load in loads for r in cells(target, mode, load) if key in r.added]
        return max(values) if values else None

    def rps_ratio(target: str, other: str, load: str) -> float | None:
        """The lowest ratio of ``target``'s requests/s to ``other``'s over the providers and modes."""
        theirs = {(r.provider, r.mode): r.rps for r in results if r.target == other and r.load == load}
        ratios = [r.rps / theirs[r.provider, r.mode] for r in results
                  if r.target == target and r.load == load and theirs.get((r.provider, r.mode))]  # fmt: skip
        return min(ratios) if ratios else None

    loads = sorted({r.load for r in results if r.load.startswith("c=")}, key=lambda x: int(x[2:]))
    top = loads[-1] if loads else None
    rows: list[dict[str, object]] = []
    for target in sorted({r.target for r in results if r.target.startswith("llmtally")}):

        def row(name: str, value: float | None, limit: float, at_most: bool = True, of: str = target) -> None:
            met = None if value is None else (value <= limit if at_most else value >= limit)
            rows.append({"target": of, "what": name, "value": value, "limit": limit, "met": met})

        row("added p50 ms, 16 clients", worst(target, "json", ("c=16",), "p50_ms"), 1.0)
        strict_mode, strict_load = STRICT_P99_CELL
        row("added p99 ms, 16 clients", worst(target, strict_mode, (strict_load,), "p99_ms"), 2.0)
        row("added p99 ms, 64 clients", worst(target, "json", ("c=64",), "p99_ms"), 10.0)
        row("SSE first byte added p50 ms", worst(target, "stream", ("c=1", "c=16"), "ttfb_p50_ms"), 1.0)
        row("SSE chunk gap added p50 ms", worst(target, "stream", ("c=1", "c=16"), "chunk_gap_p50_ms"), 1.0)
        # The issue gives the SSE targets no concurrency; judged above where its latency targets are
        # strictest, and here at its other level too, so that a miss there is not buried in the table.
        for what, key in (("first byte", "ttfb_p50_ms"), ("chunk gap", "chunk_gap_p50_ms")):
            row(f"SSE {what} added p50 ms, 64 clients", worst(target, "stream", ("c=64",), key), 1.0)
        if top is not None:
            row(f"requests/s / LiteLLM's, {top[2:]} clients", rps_ratio(target, "litellm", top), 5.0,
                at_most=False)  # fmt: skip
            row(f"requests/s / nginx's, {top[2:]} clients", rps_ratio(target, "nginx", top), 0.5,
                at_most=False)  # fmt: skip
        got = records.get(target)
        if got:
            row("records written / calls answered", got["records"] / max(1, got["measured_requests"]), 1.0,
                at_most=False)  # fmt: skip
    # After traffic with provider usage; then after a call without usage, when the record process
    # holds a tokenizer: summed RSS (which counts shared pages once per process) and the working set
    # of the proxy's own cgroup (absent where none could be made).
    memory_rows = {
        "rss_mb": "RSS MB, 1,000 streams, after traffic",
        "rss_mb_after_estimate": "RSS MB, 1,000 streams, after an estimate",
        "working_set_mb_after_estimate": "cgroup working set MB, after an estimate",
    }
    for key, what in memory_rows.items():
        value = held.get(key)
        if value is not None:
            rows.append({"target": "llmtally (default serve)", "what": what, "value": value, "limit": 150.0,
                         "met": value < 150 and (held["streams"] or 0) >= 1000})  # fmt: skip
    return rows


def _row(r: Result) -> str:
    def f(v: float | None) -> str:
        return f"{v:8.2f}" if v is not None else "       -"

    extra = ""
    if r.added:
        a = r.added
        extra = (
            f"  added p50 {a.get('p50_ms', 0):+7.2f} p99 {a.get('p99_ms', 0):+8.2f}"
            f"  rps x{a.get('rps_ratio', 0):.2f}"
        )
        if "ttfb_p50_ms" in a:
            extra += f"  ttfb {a['ttfb_p50_ms']:+.2f} gap {a.get('chunk_gap_p50_ms', 0):+.2f}"
    cpu = f" cpu {r.cpu_s:5.1f}s rss {r.peak_rss_mb:4.0f}MB" if r.cpu_s is not None else ""
    if r.loadgen_cpu_wait_us is not None:
        cpu += f" gen-wait {r.loadgen_cpu_wait_us:4.0f}us"
    if r.other_cpu_s is not None:
        cpu += f" other {r.other_cpu_s:4.2f}s"
    if r.steal_s:
        cpu += f" steal {r.steal_s:4.2f}s"
    if r.preempted_per_call is not None:
        cpu += f" preempt {r.preempted_per_call:3.1f}/call"
    return (
        f"{r.provider:9s} {r.mode:6s} {r.load:7s} {r.target:12s} {r.rps:7.0f} rps p50{f(r.p50_ms)} "
        f"p99{f(r.p99_ms)} err {r.errors}{cpu}{extra}"
    )


def chart(results: list[Result], path: Path) -> None:
    """Requests/s and added p50/p99 latency per target by concurrency: a row per provider and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.target for r in results))
    rows = list(dict.fromkeys((r.provider, r.mode) for r in results if r.load.startswith("c=")))
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(16, 4.2 * len(rows)), squeeze=False)
    for row, (provider, mode) in enumerate(rows):
        cell = [r for r in results if r.provider == provider and r.mode == mode and r.load.startswith("c=")]
        loads = list(dict.fromkeys(r.load for r in cell))
        for col, (metric, title) in enumerate(
            (
                ("rps", "requests/s"),
                ("p50_ms", "added latency p50 (ms)"),
                ("p99_ms", "added latency p99 (ms)"),
            )
        ):
            ax = axes[row][col]
            for name in names:
                ys = []
                for load in loads:
                    match = [r for r in cell if r.target == name and r.load == load]
                    if not match:
                        ys.append(float("nan"))
                    elif metric == "rps":
                        ys.append(match[0].rps)
                    else:
                        ys.append(match[0].added.get(metric, 0.0) if name != "direct" else 0.0)
                ax.plot([load[2:] for load in loads], ys, marker="o", label=name)
            kind = "streamed" if mode == "stream" else "non-streamed"
            ax.set_title(f"{provider} {kind}: {title}")
            ax.set_xlabel("concurrent clients")
            if metric != "rps":
                ax.set_yscale("symlog", linthresh=1.0)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("llmtally load test: same fake upstream (50 ms), same run")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    main()
