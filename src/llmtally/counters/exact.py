"""Opt-in exact input counts from the providers' free count endpoints, with a timeout and a cache.

Anthropic ``/v1/messages/count_tokens``, OpenAI ``/v1/responses/input_tokens`` and Gemini
``:countTokens``. Each counter module builds its own request; this module only does transport,
time-outs and caching. Off by default (``[counters.exact] enabled``); it needs the caller's API key.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping

import aiohttp
import orjson

from llmtally.config import Config
from llmtally.counters.base import ChatInput, TokenCounter
from llmtally.record import Provider

#: Environment variables the official SDKs read their keys from.
KEY_ENV: dict[Provider, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}


class ExactCountError(RuntimeError):
    """A count endpoint could not give a count (no key, timeout, an error answer)."""


class ExactCounter:
    def __init__(self, config: Config, api_keys: Mapping[str, str] | None = None) -> None:
        self._config = config.counters.exact
        self._bases: dict[Provider, str] = {
            "openai": config.upstreams.openai.rstrip("/"),
            "anthropic": config.upstreams.anthropic.rstrip("/"),
            "gemini": config.upstreams.gemini.rstrip("/"),
        }
        self._keys = dict(api_keys or {})
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, provider: Provider) -> str:
        key = self._keys.get(provider) or next(
            (os.environ[n] for n in KEY_ENV[provider] if os.environ.get(n)), None
        )
        if not key:
            names = " or ".join(KEY_ENV[provider])
            raise ExactCountError(f"exact {provider} counts need an API key ({names}, or api_keys=)")
        return key

    async def count(self, counter: TokenCounter, model: str, chat: ChatInput) -> int:
        call = counter.exact_request(model, chat)
        digest = hashlib.sha256(
            orjson.dumps([counter.provider, call.path, call.body], option=orjson.OPT_SORT_KEYS, default=str)
        ).hexdigest()
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return self._cache[digest]
        key = self._key(counter.provider)
        headers = {
            "Content-Type": "application/json",
            call.key_header: call.key_prefix + key,
            **(call.headers or {}),
        }
        url = self._bases[counter.provider] + call.path
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, data=orjson.dumps(call.body, default=str), headers=headers) as response,
            ):
                body = await response.read()
                if response.status != 200:
                    raise ExactCountError(f"{counter.provider} count endpoint answered {response.status}")
            n = counter.exact_result(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExactCountError(f"{counter.provider} count endpoint failed: {type(exc).__name__}") from None
        except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
            raise ExactCountError(f"{counter.provider} count endpoint gave no count: {exc}") from None
        with self._lock:
            self._cache[digest] = n
            while len(self._cache) > self._config.cache_entries:
                self._cache.popitem(last=False)
        return n


__all__ = ["ExactCountError", "ExactCounter"]
