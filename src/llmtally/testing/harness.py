"""Run the real proxy in-process on loopback, in front of a fake (or any) upstream."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmtally.config import Config, MeteringConfig, UpstreamsConfig
from llmtally.metering import LocalMeter
from llmtally.pipeline import MemorySink, RecordPipeline, Sink
from llmtally.pipeline.prometheus import PrometheusSink
from llmtally.proxy.app import create_app
from llmtally.proxy.fastpath import proxy_runner
from llmtally.proxy.server import local_gate


def config_for_upstream(base_url: str, config: Config | None = None, **metering: Any) -> Config:
    """``config`` with every upstream pointed at ``base_url`` (and metering overrides)."""
    config = config or Config()
    upstreams = dataclasses.replace(
        config.upstreams,
        openai=base_url,
        anthropic=base_url,
        gemini=base_url,
        azure_openai=base_url,
        vertex=base_url,
        # Bedrock only when the test turns it on (re-signing needs credentials, which it gives).
        bedrock=base_url if config.upstreams.bedrock else "",
    )
    meter = dataclasses.replace(config.metering, **metering) if metering else config.metering
    return dataclasses.replace(config, upstreams=upstreams, metering=meter)


@dataclass
class RunningProxy:
    url: str
    pipeline: RecordPipeline
    memory: MemorySink
    meter: LocalMeter
    runner: web.AppRunner
    app: web.Application
    extra_sinks: list[Sink] = field(default_factory=list)
    #: The temp spill dir :func:`start_proxy` made (none when the config names one).
    own_spill_dir: str | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.memory.records

    async def flush(self) -> list[dict[str, Any]]:
        await self.pipeline.flush()
        return self.memory.records

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.pipeline.close()
        await self.meter.close()
        if self.own_spill_dir is not None:
            # Only when empty: records a sink could not take stay where the log said they are.
            with suppress(OSError):
                os.rmdir(self.own_spill_dir)


async def start_proxy(
    config: Config, sinks: list[Sink] | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningProxy:
    """The proxy with a memory sink, Prometheus metrics and ``sinks``.

    Spills go to a private temp dir, removed by :meth:`RunningProxy.stop` if nothing was left in it.
    """
    memory = MemorySink()
    prometheus = PrometheusSink(config.sinks.prometheus.tag_labels)
    pipeline_config = config.pipeline
    own_spill_dir = None
    if not pipeline_config.spill_dir:
        own_spill_dir = tempfile.mkdtemp(prefix="llmtally-spill-")
        pipeline_config = dataclasses.replace(pipeline_config, spill_dir=own_spill_dir)
    pipeline = RecordPipeline([memory, prometheus, *(sinks or [])], pipeline_config)
    prometheus.bind(pipeline)
    meter = LocalMeter(config, pipeline)
    pipeline.start()
    meter.start()
    app = create_app(config, meter, local_gate(meter))
    runner = proxy_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return RunningProxy(
        f"http://{host}:{bound}", pipeline, memory, meter, runner, app, list(sinks or []), own_spill_dir
    )


__all__ = ["MeteringConfig", "RunningProxy", "UpstreamsConfig", "config_for_upstream", "start_proxy"]
