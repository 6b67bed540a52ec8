"""The in-process proxy harness (``llmtally.testing.harness``) cleans up after itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import openai

from llmtally.config import Config
from llmtally.pipeline.spill import read_records
from llmtally.testing import FakeUpstream
from llmtally.testing.harness import config_for_upstream, start_proxy
from tests.conftest import API_KEY

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


class RefusingSink:
    name = "refusing"

    async def write(self, records: list[dict[str, Any]]) -> None:
        raise RuntimeError("receiver down")

    async def close(self) -> None:
        pass


async def _one_call(url: str) -> None:
    client = openai.AsyncOpenAI(api_key=API_KEY, base_url=f"{url}/openai/v1", max_retries=0)
    async with client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


async def test_its_private_spill_dir_is_gone_after_stop(upstream: FakeUpstream) -> None:
    proxy = await start_proxy(config_for_upstream(upstream.url))
    assert proxy.own_spill_dir is not None and Path(proxy.own_spill_dir).is_dir()
    await _one_call(proxy.url)
    assert len(await proxy.flush()) == 1
    await proxy.stop()
    assert not Path(proxy.own_spill_dir).exists()


async def test_spilled_records_are_kept_at_stop(upstream: FakeUpstream) -> None:
    config = config_for_upstream(upstream.url)
    fast_retry = dataclasses.replace(config.pipeline, retry_attempts=1, retry_backoff_s=0.01)
    proxy = await start_proxy(dataclasses.replace(config, pipeline=fast_retry), sinks=[RefusingSink()])
    await _one_call(proxy.url)
    await proxy.stop()
    assert proxy.own_spill_dir is not None
    spilled = list(Path(proxy.own_spill_dir).glob("*.jsonl*"))
    assert [len(read_records(path)) for path in spilled] == [1], spilled


async def test_a_configured_spill_dir_is_left_alone(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = config_for_upstream(upstream.url)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    pipeline = dataclasses.replace(Config().pipeline, spill_dir=str(spill_dir))
    proxy = await start_proxy(dataclasses.replace(config, pipeline=pipeline))
    assert proxy.own_spill_dir is None
    await proxy.stop()
    assert spill_dir.is_dir()  # empty, but the user's: not removed
