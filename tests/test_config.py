"""Configuration loading, validation and environment overrides."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from llmtally.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_repo_config_toml_loads_and_equals_the_defaults() -> None:
    assert load_config(REPO / "config.toml", env={}) == Config()


def test_defaults_without_a_file() -> None:
    config = load_config(None, env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8787)
    assert config.upstreams.openai == "https://api.openai.com"
    assert config.logging.destination == "stdout"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 9000\n[upstreams]\nopenai = "http://a:1"\n')
    env = {
        "LLMTALLY_SERVER_PORT": "9100",
        "LLMTALLY_METERING_INJECT_STREAM_USAGE": "false",
        "LLMTALLY_GEMINI_TOKENIZER": "/tmp/tok.json",
        "LLMTALLY_COUNTERS_GEMINI_PRELOAD": "yes",
        "LLMTALLY_CONFIG": "ignored-here",
        "LLMTALLY_URL": "http://127.0.0.1:8787",  # the examples' variable, often exported in serve's shell
        "OTHER": "x",
    }
    config = load_config(path, env=env)
    assert config.server.port == 9100
    assert config.upstreams.openai == "http://a:1"
    assert config.metering.inject_stream_usage is False
    assert config.counters.gemini.tokenizer == "/tmp/tok.json"
    assert config.counters.gemini.preload is True


def test_fake_upstream_from_the_environment(tmp_path: Path) -> None:
    assert load_config(None, env={"LLMTALLY_UPSTREAMS_FAKE": "true"}).upstreams.fake is True


def test_price_overrides_are_decimal(tmp_path: Path) -> None:
    path = write(tmp_path, '[pricing.models."my-model"]\ninput = 0.1\noutput = "2.5"\ncache_write_1h = 6\n')
    price = load_config(path, env={}).pricing.models["my-model"]
    assert price.input == Decimal("0.1")  # not 0.1000000000000000055511151231257827
    assert (price.output, price.cache_write_1h, price.cache_read) == (Decimal("2.5"), Decimal("6"), None)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nport = 'x'\n", {}, "[server] port: expected an integer, got str 'x'"),
        ("[server]\nprot = 1\n", {}, "[server] prot: unknown key"),
        ("[serverz]\n", {}, "serverz: unknown key"),
        ("[server]\nport = 70000\n", {}, "port must be 0-65535"),
        ("[upstreams]\nopenai = 'api.openai.com'\n", {}, "[upstreams] openai: must be an http(s) URL"),
        ("[metering]\non_client_disconnect = 'ignore'\n", {}, "must be one of 'cancel', 'drain'"),
        ('[pricing.models."m"]\ninput = 1\n', {}, "missing required key output"),
        ('[pricing.models."m"]\ninput = -1\noutput = 1\n', {}, "price must be a finite number >= 0"),
        ("[server\n", {}, "not valid TOML"),
        (
            "[azure_openai.deployment_types]\nprod = 'zonal'\n",
            {},
            "[azure_openai.deployment_types] prod: use one of global, data_zone, regional, got 'zonal'",
        ),
        ("[bedrock]\nsigning = 'sigv2'\n", {}, "must be one of 'resign', 'passthrough'"),
        ("", {"LLMTALLY_SERVER_PORT": "abc"}, "environment: LLMTALLY_SERVER_PORT: expected an integer"),
        ("", {"LLMTALLY_SERVER_PROT": "1"}, "LLMTALLY_SERVER_PROT names no configuration key"),
    ],
)
def test_bad_config_names_key_and_problem(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env=env)
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml", env={})
