"""Azure OpenAI's URL layouts → routes of the OpenAI dialect."""

from __future__ import annotations

import pytest
from yarl import URL

from llmtally.platforms.azure import AzureOpenAIPlatform, reports_stream_usage

AZURE = AzureOpenAIPlatform(URL("https://myres.openai.azure.com"), {"prod-chat": "gpt-4o-2024-08-06"})


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("2024-02-15-preview", False),
        ("2024-06-01", False),
        ("2024-07-01-preview", False),
        ("2024-08-01-preview", True),
        ("2024-10-21", True),
        ("2025-04-01-preview", True),
        ("v1", True),
        ("preview", True),
        (None, True),
    ],
)
def test_which_api_versions_report_stream_usage(version: str | None, expected: bool) -> None:
    assert reports_stream_usage(version) is expected


@pytest.mark.parametrize(
    ("operation", "endpoint"),
    [
        ("chat/completions", "chat.completions"),
        ("completions", "completions"),
        ("embeddings", "embeddings"),
        ("responses", "responses"),
    ],
)
def test_classic_urls_name_the_deployment(operation: str, endpoint: str) -> None:
    route = AZURE.route("POST", f"openai/deployments/prod-chat/{operation}", {"api-version": "2024-10-21"})
    assert route.endpoint is not None and route.endpoint.name == endpoint
    assert (route.platform, route.dialect, route.model) == ("azure", "openai", "gpt-4o-2024-08-06")


def test_an_unmapped_deployment_is_priced_by_its_name() -> None:
    route = AZURE.route("POST", "openai/deployments/other/chat/completions", {"api-version": "2024-10-21"})
    assert route.model == "other"


def test_v1_urls_map_the_body_model_later() -> None:
    route = AZURE.route("POST", "openai/v1/chat/completions", {})
    assert route.endpoint is not None and route.model is None
    assert route.models["prod-chat"] == "gpt-4o-2024-08-06" and route.stream_usage


def test_early_api_versions_get_no_injection() -> None:
    route = AZURE.route(
        "POST", "openai/deployments/prod-chat/chat/completions", {"api-version": "2024-06-01"}
    )
    assert route.endpoint is not None and not route.stream_usage


@pytest.mark.parametrize(
    ("method", "tail"),
    [
        ("GET", "openai/deployments/prod-chat/chat/completions"),
        ("POST", "openai/deployments/prod-chat/images/variations"),
        ("POST", "openai/files"),
        ("GET", "openai/v1/models"),
    ],
)
def test_everything_else_passes_through(method: str, tail: str) -> None:
    assert AZURE.route(method, tail, {}).endpoint is None


def test_image_generation_and_edits_are_metered_as_openai_s() -> None:
    """gpt-image-1 deployments answer the Images API with OpenAI's token usage (image tokens priced at
    image rates, docs/pricing.md); the model for pricing is the deployment's."""
    for operation in ("images/generations", "images/edits"):
        route = AZURE.route("POST", f"openai/deployments/prod-chat/{operation}", {})
        assert route.endpoint is not None and route.endpoint.name == operation.replace("/", ".")
        assert route.model == "gpt-4o-2024-08-06"


def test_routes_are_remembered_but_bounded() -> None:
    platform = AzureOpenAIPlatform(URL("https://r.openai.azure.com"), {})
    first = platform.route("POST", "openai/deployments/a/chat/completions", {})
    assert platform.route("POST", "openai/deployments/a/chat/completions", {}) is first
    for i in range(3000):
        platform.route("POST", f"openai/deployments/d{i}/chat/completions", {})
    assert len(platform._routes) <= 1024
