"""Which provider serves a model, from its name alone."""

from __future__ import annotations

from llmtally.record import Provider

_PREFIXES: tuple[tuple[str, Provider], ...] = (
    ("claude", "anthropic"),
    ("anthropic.", "anthropic"),
    ("gemini", "gemini"),
    ("gemma", "gemini"),
    ("text-embedding-004", "gemini"),
    ("embedding-001", "gemini"),
    ("gpt", "openai"),
    ("chatgpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("text-embedding", "openai"),
    ("text-davinci", "openai"),
    ("davinci", "openai"),
    ("babbage", "openai"),
    ("code-davinci", "openai"),
    ("codex", "openai"),
    ("omni-moderation", "openai"),
)


def infer_provider(model: str) -> Provider | None:
    """``gpt-4o-2024-08-06`` → openai, ``models/gemini-2.5-pro`` → gemini, ``ft:gpt-4o:…`` → openai."""
    name = model.strip().lower()
    if name.startswith("ft:"):
        name = name.split(":")[1] if ":" in name[3:] else name[3:]
    name = name.removeprefix("models/").removeprefix("tunedmodels/")
    for prefix in ("openai/", "anthropic/", "google/", "gemini/"):
        if name.startswith(prefix):
            return {"openai/": "openai", "anthropic/": "anthropic"}.get(prefix, "gemini")  # type: ignore[return-value]
    for prefix, provider in _PREFIXES:
        if name.startswith(prefix):
            return provider
    return None
