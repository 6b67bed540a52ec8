"""Configuration: ``config.toml``, then ``LLMTALLY_<SECTION>_<KEY>`` environment variables.

Precedence, highest first: environment variable → config file → built-in default.
Every section is a frozen dataclass; one generic loader validates the TOML against the
dataclass field types so an error names the key and the problem, and unknown keys are refused
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ENV_PREFIX = "LLMTALLY_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the source, the key and the problem."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    #: Seconds in-flight requests and streams get to finish after SIGTERM.
    shutdown_grace_s: float = 30.0
    #: Largest request body read into memory for metered endpoints (others are streamed).
    max_request_body_mb: int = 64
    #: Add ``x-llmtally-overhead-ms`` to every proxied response.
    overhead_header: bool = True
    #: A second listener serving only /healthz, /readyz and /metrics (for probes and scrapes from
    #: outside the pod while the proxy itself stays on 127.0.0.1). Port 0: off.
    admin_host: str = "0.0.0.0"
    admin_port: int = 0
    #: Proxy processes sharing the port (SO_REUSEPORT); records are built and delivered by the main
    #: process. 0: one process does both (record building then competes with the proxy for the GIL).
    workers: int = 1
    #: Metered calls skip aiohttp's request machinery (llmtally.proxy.fastpath); false: aiohttp serves all.
    fast_path: bool = True
    #: Limits of an HTTP head, applied alike to requests (fast path and aiohttp) and to upstream
    #: responses (both clients): aiohttp's own defaults. Past them: 400 to a client, 502 from an upstream.
    max_line_bytes: int = 8190
    max_field_bytes: int = 8190
    max_headers: int = 128
    #: A request head must arrive whole within this long of its first byte (slowloris): else 408.
    head_timeout_s: float = 10.0
    #: A request body must arrive within ``body_grace_s`` plus its length at this rate: else 408.
    min_body_rate_bytes_s: int = 16384
    body_grace_s: float = 10.0
    #: Add ``x-llmtally-request-id`` (the record's ``request_id``) to every metered response.
    request_id_header: bool = True
    #: Add ``x-llmtally-cost`` (USD) to non-streamed 2xx responses with provider usage.
    cost_header: bool = True
    #: ``GET /calls/{request_id}`` on the admin port keeps records this long, at most this many.
    calls_window_s: float = 300.0
    calls_max: int = 10000
    #: A second listener serving the same proxy over TLS (HTTPS and WSS) when ``tls_cert_file`` is
    #: set: a PEM certificate chain, its key in ``tls_key_file`` (empty: in the chain's file).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Its port (0: any free port, logged); the plain-HTTP ``port`` keeps serving beside it.
    tls_port: int = 8788

    @property
    def head_limits(self) -> HeadLimits:
        return HeadLimits(self.max_line_bytes, self.max_field_bytes, self.max_headers)


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Sizes an HTTP head may not exceed (a line, one header field, the number of headers)."""

    max_line_bytes: int = 8190
    max_field_bytes: int = 8190
    max_headers: int = 128

    @property
    def max_head_bytes(self) -> int:
        """Everything a head within the limits can add up to (line, fields, their CRLFs)."""
        return self.max_line_bytes + self.max_headers * (self.max_field_bytes + 2) + 4


@dataclass(frozen=True, slots=True)
class UpstreamsConfig:
    openai: str = "https://api.openai.com"
    anthropic: str = "https://api.anthropic.com"
    gemini: str = "https://generativelanguage.googleapis.com"
    #: An Azure OpenAI resource (``https://<resource>.openai.azure.com``), served under
    #: ``/azure-openai`` (empty: that route is off).
    azure_openai: str = ""
    #: Google Vertex AI, served under ``/vertex``; ``{location}`` is filled from the request path's
    #: ``locations/{l}`` (a region name, or ``global`` for the global host). Empty: off.
    vertex: str = "https://{location}-aiplatform.googleapis.com"
    #: Amazon Bedrock's runtime (``https://bedrock-runtime.<region>.amazonaws.com``), served under
    #: ``/bedrock`` (empty: that route is off).
    bedrock: str = ""
    connect_timeout_s: float = 10.0
    #: Longest wait from sending a request to its response's head (a model may think a while): 504.
    first_byte_timeout_s: float = 600.0
    #: Longest silence between two upstream bytes of a response body: the stream is cut.
    read_timeout_s: float = 600.0
    #: Most connections open at once to one upstream host (0: no limit). Every call in flight holds
    #: one, streams included; at the limit a call waits up to ``connect_timeout_s`` for a free one.
    max_connections: int = 0
    #: PEM file of the CA certificates that upstream TLS certificates are verified against, for both
    #: upstream clients ("": the system's default store, which honours ``SSL_CERT_FILE``).
    ca_file: str = ""
    #: Answer every call with llmtally's built-in fake upstream, started in-process (``serve
    #: --fake-upstream``): no key, no network; every record then carries ``fake_upstream: true``.
    fake: bool = False


@dataclass(frozen=True, slots=True)
class BedrockConfig:
    #: ``resign``: drop the client's SigV4 signature (made for the proxy's host) and sign again for
    #: the upstream with the AWS default credential chain; ``passthrough``: forward auth untouched
    #: (Bedrock API keys, ``Authorization: Bearer …``).
    signing: Literal["resign", "passthrough"] = "resign"
    #: The region to sign for (empty: read from the upstream's host name).
    region: str = ""
    #: Application inference profile (its ARN, or the id at its end) → the model it routes to, for
    #: pricing: the ARN does not say which model it is.
    inference_profiles: dict[str, str] = field(default_factory=dict)


AZURE_DEPLOYMENT_TYPES = ("global", "data_zone", "regional")


@dataclass(frozen=True, slots=True)
class AzureOpenAIConfig:
    #: Deployment name → the model it serves (``prod-chat = "gpt-4o-2024-08-06"``), for pricing
    #: when a response does not name its model.
    deployments: dict[str, str] = field(default_factory=dict)
    #: Deployment name → its type, ``global`` (the default), ``data_zone`` or ``regional``: not on the
    #: wire, and the price data has Global rates only, so other types are priced at those with a note.
    deployment_types: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MeteringConfig:
    #: Add ``stream_options.include_usage`` to OpenAI streams that lack it (and hide what it adds).
    inject_stream_usage: bool = True
    #: ``cancel``: close the upstream call when the client goes away; ``drain``: read it to the end.
    on_client_disconnect: Literal["cancel", "drain"] = "cancel"
    #: Most upstream streams drained in the background at once; past that, cancel.
    max_drains: int = 64
    #: Longest a background drain may take.
    drain_timeout_s: float = 300.0
    #: Largest response body kept for parsing; a larger non-streamed body is forwarded but not metered.
    max_response_body_mb: int = 64
    #: Bytes of streams a proxy worker may hold, all streams together, so that they are parsed in
    #: the record process rather than on the loop that forwards them; past it (and at 0) a stream
    #: is parsed in the worker as it passes.
    deferred_stream_parse_mb: int = 32
    #: Count each request's input tokens locally even when the provider reports usage (for comparison
    #: and to calibrate Claude estimates). Off by default: the provider's usage is what is billed, and
    #: the tokenizer tables cost ~45 MB in a sidecar that may never need them; a record without
    #: provider usage is estimated either way.
    estimate_input: bool = False
    #: Longest line of a batch result download kept for parsing (each line is one result); a longer
    #: line is forwarded, skipped and counted (its record says so), never buffered without bound.
    max_batch_line_mb: int = 8


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    #: Where usage records go: ``stdout`` or a file path (JSON lines). Diagnostics go to stderr.
    destination: str = "stdout"
    #: Level of diagnostic logs on stderr.
    level: Literal["debug", "info", "warning", "error"] = "info"


def configure_logging(level: str) -> None:
    """Diagnostics go to stderr; stdout carries usage records only."""
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class RateOverride:
    """Rates that replace a model's base rates (a tier, a service tier); missing keys keep the base."""

    input: Decimal | None = None
    output: Decimal | None = None
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None
    #: Audio read from the prompt cache (OpenAI Realtime); default: ``cache_read``.
    cache_read_audio: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PriceTier(RateOverride):
    """Long-context pricing: a request whose input exceeds ``above`` is priced wholly at these rates."""

    above: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A configured price, USD per 1M tokens. Missing cache, audio and image prices fall back as
    documented."""

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    #: 5-minute cache write.
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    input_image: Decimal | None = None
    output_image: Decimal | None = None
    #: Audio read from the prompt cache (OpenAI Realtime); default: ``cache_read``.
    cache_read_audio: Decimal | None = None
    tiers: list[PriceTier] = field(default_factory=list)
    #: ``batch``, ``flex``, ``priority``, …: rates for calls made in that service tier.
    service_tiers: dict[str, RateOverride] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    #: Per-model overrides, ``[pricing.models."<model>"]``; they win over the prices file and genai-prices.
    models: dict[str, ModelPrice] = field(default_factory=dict)
    #: ``"my-deployment" = "gpt-4o"``: price a name as another model.
    aliases: dict[str, str] = field(default_factory=dict)
    #: Line item → USD per use (``web_search = "0.01"``): wins over genai-prices and the fee table.
    fees: dict[str, Decimal] = field(default_factory=dict)
    #: A prices file (llmtally TOML or LiteLLM's model_prices_and_context_window.json); empty: none.
    file: str = ""
    #: Seconds between checks of the config and prices files for changes (0: only on SIGHUP).
    reload_interval_s: float = 5.0
    #: Refresh the genai-prices data from its published source in the background (needs network).
    auto_update: bool = False
    auto_update_interval_h: float = 1.0


@dataclass(frozen=True, slots=True)
class GeminiCounterConfig:
    #: Path of the Gemma 3 ``tokenizer.json`` (optionally ``.gz``) or SentencePiece ``.model``;
    #: empty means the copy bundled with llmtally.
    tokenizer: str = ""
    #: Load the tokenizer at start (costs ~2 s and ~0.5 GB) instead of on first use.
    preload: bool = False


@dataclass(frozen=True, slots=True)
class ExactCountConfig:
    """Opt-in exact counts from the providers' free count endpoints (library ``count_tokens``)."""

    enabled: bool = False
    #: Give up on an endpoint after this long and fall back to the local count.
    timeout_s: float = 5.0
    #: Counts remembered per request content.
    cache_entries: int = 1024


@dataclass(frozen=True, slots=True)
class CountersConfig:
    #: Byte budget of the content cache of token counts (a conversation recounts only new texts).
    cache_mb: int = 16
    gemini: GeminiCounterConfig = field(default_factory=GeminiCounterConfig)
    exact: ExactCountConfig = field(default_factory=ExactCountConfig)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Record delivery: queueing, batching, retries and the spill files behind every sink."""

    #: Records waiting to be built and delivered; past this, ``overflow`` applies.
    max_queue: int = 10_000
    batch_size: int = 256
    #: ``spill``: write overflowing records to the spill directory (delivered later); ``drop``: count and log.
    overflow: Literal["spill", "drop"] = "spill"
    #: Where undeliverable records wait (empty: <system temp dir>/llmtally-spill). Use a volume in k8s.
    spill_dir: str = ""
    #: Batches a sink may fall behind by before further batches spill for it.
    sink_queue: int = 64
    #: Longest one sink write may take before it counts as failed.
    sink_timeout_s: float = 10.0
    retry_attempts: int = 5
    retry_backoff_s: float = 0.2
    retry_backoff_max_s: float = 10.0
    #: How often spilled records are retried.
    replay_interval_s: float = 30.0
    #: ``llmtally serve``: each proxy worker appends every finished call's exchange to a journal the
    #: record process replays after a SIGKILL (docs/reliability.md, "Crash recovery").
    journal: bool = True
    #: Where the journal lives (empty: <spill_dir>/journal-<port>). One meter per journal dir.
    journal_dir: str = ""
    #: fsync every journal append: survives a machine crash too, at the cost of a disk flush per call.
    journal_fsync: bool = False
    #: A worker starts a new journal segment past this size; a segment is deleted once all delivered.
    journal_segment_mb: int = 16
    #: At shutdown, after in-flight calls ended: the longest delivery may take before what is left
    #: is saved to the spill files (the last quarter, at most 5 s, is kept for saving).
    close_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class FileSinkConfig:
    #: A JSON-lines file with size-based rotation (empty: off).
    path: str = ""
    max_mb: int = 100
    #: Rotated files kept: path.1 … path.N.
    backups: int = 5


@dataclass(frozen=True, slots=True)
class PrometheusSinkConfig:
    #: Serve metrics at GET /metrics.
    enabled: bool = True
    #: Tag keys to add as labels (each adds a label dimension: mind the cardinality).
    tag_labels: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WebhookSinkConfig:
    #: POST batches of records as JSON here (empty: off).
    url: str = ""
    timeout_s: float = 10.0
    #: Extra request headers, e.g. an Authorization for the receiver.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OtelSinkConfig:
    #: Export GenAI metrics and spans over OTLP (needs ``llmtally[otel]``; OTEL_* variables configure it).
    enabled: bool = False


@dataclass(frozen=True, slots=True)
class ProtobufSinkConfig:
    #: Append length-delimited ``llmtally.v1.UsageRecord`` messages to this file (empty: off).
    path: str = ""


@dataclass(frozen=True, slots=True)
class PostgresSinkConfig:
    #: ``postgresql://user:password@host:port/database``: one row per record in this database, in the
    #: table llmtally creates and migrates (empty: off). Needs ``llmtally[postgres]``.
    dsn: str = ""
    #: Longest connecting (and the schema check after it) may take before the write counts as failed.
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class SinksConfig:
    file: FileSinkConfig = field(default_factory=FileSinkConfig)
    prometheus: PrometheusSinkConfig = field(default_factory=PrometheusSinkConfig)
    webhook: WebhookSinkConfig = field(default_factory=WebhookSinkConfig)
    otel: OtelSinkConfig = field(default_factory=OtelSinkConfig)
    protobuf: ProtobufSinkConfig = field(default_factory=ProtobufSinkConfig)
    postgres: PostgresSinkConfig = field(default_factory=PostgresSinkConfig)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """A spend limit (docs/budgets.md): calls that ``match`` share one budget per matched value."""

    name: str
    #: ``provider`` / ``platform`` / ``model`` / ``endpoint`` = a value to match, or "*" for one budget
    #: per value; ``tag`` = a tag name (one budget per value of that tag; untagged calls do not match);
    #: ``"tag.<name>"`` = a value that tag must have.
    match: dict[str, str] = field(default_factory=dict)
    limit_usd: Decimal = Decimal(0)
    period: Literal["day", "month", "total"] = "month"
    action: Literal["block", "warn"] = "block"


@dataclass(frozen=True, slots=True)
class BudgetsConfig:
    """Spend limits, checked before a call goes upstream (off when there are no rules)."""

    #: "memory" (this one process, or this pod's workers) or a Redis URL shared by the fleet
    #: (``redis://host:6379/0``, ``rediss://…``, ``unix:///path/redis.sock``).
    store: str = "memory"
    #: When the store cannot be reached: "allow" forwards (counted, settled later), "block" answers 503.
    on_store_error: Literal["allow", "block"] = "allow"
    #: Output tokens reserved for a call whose request names no maximum (``max_tokens`` …).
    default_output_tokens: int = 4096
    #: A reservation never settled (its proxy died mid-call) is released after this long.
    reservation_ttl_s: float = 900.0
    #: How long the store may take to answer a check before the call counts as a store error.
    store_timeout_s: float = 0.5
    rules: list[BudgetRule] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RealtimeConfig:
    """WebSocket sessions (OpenAI Realtime, Gemini Live), each proxy process's own limits."""

    #: Largest message either side may send (aiohttp closes the session with 1009 past it).
    max_message_mb: int = 16
    #: A session with no message either way for this long is closed (1001, both sides). 0: never.
    idle_timeout_s: float = 600.0
    #: Sessions one proxy process holds at once; more are answered 503 before the upgrade. 0: no cap.
    max_sessions: int = 1000


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: UpstreamsConfig = field(default_factory=UpstreamsConfig)
    azure_openai: AzureOpenAIConfig = field(default_factory=AzureOpenAIConfig)
    bedrock: BedrockConfig = field(default_factory=BedrockConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    counters: CountersConfig = field(default_factory=CountersConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)


#: Environment variables that are not ``<SECTION>_<KEY>`` of a section.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "GEMINI_TOKENIZER": ("counters", "gemini", "tokenizer"),
}
#: Environment variables read elsewhere (not configuration keys): ``LLMTALLY_CONFIG`` (the file),
#: ``LLMTALLY_URL`` (where clients such as the examples find the proxy, often set in serve's shell too).
ENV_RESERVED = frozenset({"CONFIG", "URL"})


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load ``path`` (or defaults when None), then apply ``LLMTALLY_*`` environment overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    text = ""
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode("utf-8", "replace")
            raw = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    env = os.environ if env is None else env
    _apply_env(raw, env)
    try:
        config: Config = _build(Config, raw, source, ())
    except ConfigError as exc:
        message = str(exc)
        if text and message.startswith(f"{source}: "):  # name the line in the file
            rest = message.removeprefix(f"{source}: ")
            raise ConfigError(f"{source}:{toml_line(text, rest)}: {rest}") from None
        raise
    from llmtally.budgets.rules import check_budgets  # late: it builds on these dataclasses

    check_budgets(config.budgets, source)
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in ENV_RESERVED:
            continue
        target = ENV_ALIASES.get(rest) or _env_target(rest)
        if target is None:
            raise ConfigError(f"environment: {name} names no configuration key")
        node = raw
        for part in target[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name}: [{part}] is not a section in the config file")
        # Marked so the builder coerces it from text and names the variable in errors.
        node[target[-1]] = _EnvValue(name, value)


_WHERE = re.compile(r"^\[(?P<section>[^\]]*)\] (?P<key>[^:]+):")


def toml_line(text: str, message: str) -> int:
    """The 1-based line of the key a ``[section] key: problem`` message names (1 when unknown)."""
    match = _WHERE.match(message)
    if match is None:
        return 1
    parts = [p.strip('"') for p in re.findall(r'"[^"]*"|[^.]+', match["section"])]
    key = match["key"].strip().strip('"').split("[")[0]
    lines = text.splitlines()

    def header(names: list[str]) -> int | None:
        pattern = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(f'"?{re.escape(n)}"?' for n in names) + r"\s*\]")
        return next((i for i, line in enumerate(lines) if pattern.match(line)), None)

    start = header(parts) if parts else 0
    if start is not None:
        assignment = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        for i in range(start, len(lines)):
            if i > start and lines[i].lstrip().startswith("["):
                break
            if assignment.match(lines[i]):
                return i + 1
    table = header([*parts, key])  # the key names a sub-table, e.g. [pricing.models."gpt-4o"]
    if table is not None:
        return table + 1
    return start + 1 if start is not None else 1


def _env_target(rest: str) -> tuple[str, ...] | None:
    """Map ``SERVER_PORT`` → (server, port), ``COUNTERS_GEMINI_PRELOAD`` → (counters, gemini, preload)."""
    return _match_fields(Config, rest.lower())


def _match_fields(cls: type, rest: str) -> tuple[str, ...] | None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if rest == f.name and not dataclasses.is_dataclass(hints[f.name]):
            return (f.name,)
        if rest.startswith(f.name + "_") and dataclasses.is_dataclass(hints[f.name]):
            sub = _match_fields(hints[f.name], rest[len(f.name) + 1 :])
            if sub is not None:
                return (f.name, *sub)
    return None


@dataclass(frozen=True, slots=True)
class _EnvValue:
    name: str
    text: str


def _where(source: str, path: tuple[str, ...]) -> str:
    if not path:
        return source
    section = ".".join(f'"{p}"' if not p.isidentifier() else p for p in path[:-1])
    key = path[-1]
    return f"{source}: [{section}] {key}" if section else f"{source}: {key}"


def _build(cls: type, raw: Any, source: str, path: tuple[str, ...]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source, path)}: expected a table, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        known = ", ".join(sorted(names))
        raise ConfigError(f"{_where(source, (*path, unknown[0]))}: unknown key (known: {known})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, source, (*path, name))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        missing = str(exc).split("argument")[-1].strip(": '")
        raise ConfigError(f"{_where(source, path)}: missing required key {missing}") from None


def _coerce(tp: Any, value: Any, source: str, path: tuple[str, ...]) -> Any:
    where = _where(source, path)
    if isinstance(value, _EnvValue):
        where = f"environment: {value.name}"
        value = _parse_env_text(tp, value.text, where)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, path)  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, source, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {_describe(value)}")
        return [_coerce(item_tp, v, source, (*path, f"{path[-1]}[{i}]")) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {_describe(value)}")
        return {str(k): _coerce(val_tp, v, source, (*path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        if path[-1] in ("port", "tls_port") and not 0 <= value <= 65535:
            raise ConfigError(f"{where}: port must be 0-65535, got {value}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return float(value)
    if tp is Decimal:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            unit = "per use" if path[:2] == ("pricing", "fees") else "per 1M tokens"
            raise ConfigError(f"{where}: expected a price in USD {unit}, got {_describe(value)}")
        try:
            # str() first: Decimal(0.1) would carry the float's binary error into money.
            dec = Decimal(str(value))
        except InvalidOperation:
            raise ConfigError(f"{where}: not a number: {value!r}") from None
        if not dec.is_finite() or dec < 0:
            raise ConfigError(f"{where}: price must be a finite number >= 0, got {value!r}")
        return dec
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        optional = path[-1] in ("azure_openai", "vertex", "bedrock")  # a route that is off when empty
        if path[0] == "upstreams" and (path[-1] in ("openai", "anthropic", "gemini") or (optional and value)):
            _check_url(value.replace("{location}", "us-central1"), where)  # a template, with a region
        if path[:2] == ("azure_openai", "deployment_types") and value not in AZURE_DEPLOYMENT_TYPES:
            raise ConfigError(f"{where}: use one of {', '.join(AZURE_DEPLOYMENT_TYPES)}, got {value!r}")
        if path == ("upstreams", "ca_file") and value:
            _check_ca_file(value, where)
        tls_file = path[:1] == ("server",) and path[-1] in ("tls_cert_file", "tls_key_file")
        if tls_file and value and not os.path.isfile(value):
            raise ConfigError(f"{where}: no such file: {value!r}")
        if path[:2] == ("sinks", "webhook") and path[-1] == "url" and value:
            _check_url(value, where)
        if path == ("sinks", "postgres", "dsn") and value:
            _check_postgres_dsn(value, where)
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema bug


def _parse_env_text(tp: Any, text: str, where: str) -> Any:
    if get_origin(tp) in (types.UnionType, typing.Union):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    return text


def _check_url(value: str, where: str) -> None:
    from yarl import URL

    try:
        url = URL(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a URL: {value!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{where}: must be an http(s) URL with a host, got {value!r}")


def _check_postgres_dsn(value: str, where: str) -> None:
    # The value itself is not echoed: a DSN carries its password.
    if not value.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{where}: must be a postgresql://user:password@host:port/database URL")


def _check_ca_file(path: str, where: str) -> None:
    import ssl

    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file: {path!r}")
    try:  # refused now, not when the first call needs it
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: not a PEM file of CA certificates: {path!r} ({exc})") from None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"
