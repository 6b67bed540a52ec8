"""Hot reload of prices: watch the config and prices files (and SIGHUP), swap the price book atomically.

Files are compared by content every ``[pricing] reload_interval_s`` seconds, which also catches
Kubernetes ConfigMap updates (a symlink swap that leaves mtimes unreliable). A new book is parsed and
validated in a thread, off the request path; a bad file is rejected with a message naming the file,
line and problem, and the old prices stay in force. Records always carry the ``price_version`` of the
one book that priced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from genai_prices.data_snapshot import get_snapshot

from llmtally.config import Config, ConfigError, load_config
from llmtally.pricing.engine import PriceBook
from llmtally.pricing.files import PriceFileError
from llmtally.tasks import cancel_and_wait

log = logging.getLogger("llmtally.pricing")


def _digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "missing"


class PriceReloader:
    """Rebuilds the price book when its inputs change; ``apply`` receives each new book."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        apply: Callable[[PriceBook], None],
        current: PriceBook,
        apply_config: Callable[[Config], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._apply = apply
        self._apply_config = apply_config
        self._book = current
        self._trigger = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen = self._fingerprint(config)
        self.reloads = 0
        self.failures = 0

    def _fingerprint(self, config: Config) -> tuple[str | None, str | None, int]:
        return _digest(self.config_path), _digest(config.pricing.file), id(get_snapshot())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmtally-price-reload")

    def trigger(self) -> None:
        """Reload now (SIGHUP)."""
        self._trigger.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            interval = self.config.pricing.reload_interval_s or None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trigger.wait(), interval)
            forced = self._trigger.is_set()
            self._trigger.clear()
            await self.check(force=forced)

    async def check(self, force: bool = False) -> bool:
        """Reload if an input changed (or ``force``); True when a new book is in force."""
        fingerprint = await asyncio.to_thread(self._fingerprint, self.config)
        if fingerprint == self._seen and not force:
            return False
        self._seen = fingerprint
        try:
            config, book = await asyncio.to_thread(self._build)
        except (ConfigError, PriceFileError) as exc:
            self.failures += 1
            log.error(
                "price reload rejected, old prices (version %s) stay in force: %s", self._book.version, exc
            )
            return False
        restart_needed = [
            name
            for name in ("server", "upstreams", "metering", "logging", "counters")
            if getattr(config, name) != getattr(self.config, name)
        ]
        if restart_needed:
            log.warning("config changes in [%s] take effect after a restart", "], [".join(restart_needed))
        old = self._book.version
        self.config = replace(self.config, pricing=config.pricing, budgets=config.budgets)
        self._book = book
        self._apply(book)
        if self._apply_config is not None:  # budget rules and limits, hot like prices
            self._apply_config(self.config)
        self.reloads += 1
        log.info("prices reloaded: version %s -> %s", old, book.version)
        return True

    def _build(self) -> tuple[Config, PriceBook]:
        config = load_config(self.config_path) if self.config_path else self.config
        return config, PriceBook(config.pricing)


def start_auto_update(interval_h: float) -> object:
    """Refresh genai-prices' data in its own background thread (opt-in; never blocks a request)."""
    from genai_prices import UpdatePrices

    updater = UpdatePrices(update_interval=interval_h * 3600)
    updater.start(wait=False)
    log.info("genai-prices auto-update on, every %.1f h", interval_h)
    return updater
