"""The direct platforms: the providers' own APIs, one prefix each."""

from __future__ import annotations

from llmtally.config import Config, UpstreamsConfig
from llmtally.platforms import build_platforms


def test_each_provider_has_its_prefix_and_upstream() -> None:
    platforms = build_platforms(Config(upstreams=UpstreamsConfig(openai="http://127.0.0.1:9/base")))
    assert sorted(platforms) == ["anthropic", "gemini", "openai", "vertex"]  # Azure: off unless configured
    route = platforms["openai"].route("POST", "v1/chat/completions", {})
    assert (route.platform, route.dialect, route.prefix) == ("direct", "openai", "openai")
    assert route.endpoint is not None and route.endpoint.name == "chat.completions"
    assert str(route.upstream) == "http://127.0.0.1:9/base"


def test_unmetered_methods_and_paths_pass_through() -> None:
    gemini = build_platforms(Config())["gemini"]
    assert gemini.route("GET", "v1beta/models", {}).endpoint is None
    assert gemini.route("GET", "v1beta/models/gemini-2.5-flash:generateContent", {}).endpoint is None
    metered = gemini.route("POST", "v1beta/models/gemini-2.5-flash:streamGenerateContent", {})
    assert metered.endpoint is not None and metered.endpoint.url_model == "gemini-2.5-flash"


def test_a_metered_route_is_made_once() -> None:
    anthropic = build_platforms(Config())["anthropic"]
    assert anthropic.route("POST", "v1/messages", {}) is anthropic.route("POST", "v1/messages", {})
