"""``llmtally serve | demo | count | price``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import orjson

from llmtally.config import Config, ConfigError, load_config


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = getattr(args, "config", None) or os.environ.get("LLMTALLY_CONFIG")
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    return path


def _config_from(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from llmtally.pricing import PriceBook, PriceFileError
    from llmtally.serving import run

    path = _config_path(args)
    config = load_config(path)
    try:
        PriceBook(config.pricing)  # a bad prices file is refused at start, like a bad config
    except PriceFileError as exc:
        print(f"llmtally: prices file error: {exc}", file=sys.stderr)
        return 2
    return run(
        config,
        host=args.host,
        port=args.port,
        config_path=path,
        workers=args.workers,
        fake_upstream=args.fake_upstream,
    )


def _cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        server = _config_from(args).server
        host, port = (
            (server.admin_host, server.admin_port) if server.admin_port else (server.host, server.port)
        )
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{host}:{port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"llmtally health: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from llmtally.demo import run_demo

    return run_demo()


def _cmd_count(args: argparse.Namespace) -> int:
    from llmtally.providers import ADAPTERS
    from llmtally.tracker import TokenCountParams, TokenTracker, UnknownModelError

    tracker = TokenTracker(_config_from(args), strict=args.strict)
    source = args.request or args.file
    data = sys.stdin.buffer.read() if source in (None, "-") else Path(source).read_bytes()
    if args.request:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            print(f"llmtally count: {source} is not JSON: {exc}", file=sys.stderr)
            return 2
        model = args.model or payload.get("model")
        if not isinstance(model, str):
            print("llmtally count: the request names no model; pass --model", file=sys.stderr)
            return 2
        try:
            provider = tracker.provider_of(model, args.provider)
        except UnknownModelError as exc:
            print(f"llmtally count: {exc}", file=sys.stderr)
            return 2
        endpoint = ADAPTERS[provider].endpoint_for_request(payload, model)
        count = tracker.counters[provider].count_request(model, endpoint.name, payload)
    else:
        if not args.model:
            print("llmtally count: --model is required", file=sys.stderr)
            return 2
        model = args.model
        try:
            provider = tracker.provider_of(model, args.provider)
            count = tracker.count_tokens(
                TokenCountParams(model=model, text=data.decode("utf-8"), provider=args.provider)
            )
        except UnknownModelError as exc:
            print(f"llmtally count: {exc}", file=sys.stderr)
            return 2
    out: dict[str, object] = {
        "model": model,
        "provider": provider,
        "input_tokens": count.input_tokens,
        "exact": count.exact,
        "tokenizer": count.tokenizer,
    }
    if count.note:
        out["note"] = count.note
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


def _cmd_price(args: argparse.Namespace) -> int:
    from llmtally.pipeline import decimal_text
    from llmtally.pricing import PriceBook, PriceFileError
    from llmtally.providers.infer import infer_provider
    from llmtally.record import TokenUsage

    config = _config_from(args)
    provider = args.provider or infer_provider(args.model)
    if provider is None:
        print(
            f"llmtally price: cannot tell the provider of model {args.model!r}; pass --provider",
            file=sys.stderr,
        )
        return 2
    usage = TokenUsage(
        input_tokens=args.input,
        output_tokens=args.output,
        cache_read_tokens=args.cache_read,
        cache_write_tokens=args.cache_write,
        cache_write_1h_tokens=args.cache_write_1h,
        reasoning_tokens=args.reasoning,
        input_audio_tokens=args.input_audio,
        output_audio_tokens=args.output_audio,
    )
    try:
        book = PriceBook(config.pricing)
    except PriceFileError as exc:
        print(f"llmtally price: prices file error: {exc}", file=sys.stderr)
        return 2
    quote = book.quote(provider, args.model, usage, service_tier=args.service_tier)

    def money(value: Decimal | None) -> object:
        return orjson.Fragment(decimal_text(value)) if value is not None else None

    out = {
        "model": args.model,
        "provider": provider,
        "input_cost": money(quote.cost.input_cost if quote.cost else None),
        "output_cost": money(quote.cost.output_cost if quote.cost else None),
        "total_cost": money(quote.cost.total_cost if quote.cost else None),
        "currency": "USD",
        "price_source": quote.price_source,
        "price_version": quote.price_version,
        "priced_model": quote.priced_as,
    }
    if quote.note:
        out["pricing_note"] = quote.note
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0 if quote.cost is not None else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from llmtally.pipeline import report as r

    by = [b for item in (args.by or []) for b in item.split(",") if b] or list(r.DEFAULT_GROUPING)
    try:
        since, until = r.parse_when(args.since, "--since"), r.parse_when(args.until, "--until")
        records = list(r.read_records(args.files))
        totals, groups = r.build_report(records, by, since, until)
        if args.plot:
            kept = [rec for rec in records if _in_window(rec, since, until)]
            r.plot_cost_over_time(kept, args.plot)
    except r.ReportError as exc:
        print(f"llmtally report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(r.render_json(totals, groups, by))
    elif args.csv:
        sys.stdout.write(r.render_csv(groups, by))
    else:
        sys.stdout.write(r.render_table(totals, groups, by))
    return 0


def _in_window(record: dict[str, object], since: object, until: object) -> bool:
    from llmtally.pipeline.report import parse_when

    when = parse_when(str(record.get("timestamp")), "timestamp")
    return when is not None and not (since and when < since) and not (until and when >= until)  # type: ignore[operator]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtally", description="LLM usage metering proxy and library.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the metering proxy")
    serve.add_argument(
        "--config", help="config file (default: ./config.toml if present, else built-in defaults)"
    )
    serve.add_argument("--host", help="listen address (overrides [server] host)")
    serve.add_argument("--port", type=int, help="listen port (overrides [server] port)")
    serve.add_argument(
        "--workers",
        type=_non_negative,
        help="proxy processes sharing the port (overrides [server] workers; 0: a single process)",
    )
    serve.add_argument(
        "--fake-upstream",
        action="store_true",
        help="answer every call with the built-in fake upstream (no key, no network; records say so)",
    )
    serve.set_defaults(func=_cmd_serve)

    health = sub.add_parser(
        "health", help="exit 0 when a running proxy answers /healthz (container health checks)"
    )
    health.add_argument("--config")
    health.add_argument(
        "--url", help="URL to check (default: from the config: the admin listener, else the proxy)"
    )
    health.add_argument("--path", default="/healthz", help="/healthz (alive) or /readyz (ready)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_cmd_health)

    demo = sub.add_parser("demo", help="run the proxy against a built-in fake upstream and show the records")
    demo.set_defaults(func=_cmd_demo)

    count = sub.add_parser("count", help="count the tokens of a text (file or stdin) or of a request body")
    count.add_argument("--model", help="the model (for --request: default is the body's model)")
    count.add_argument("--provider", choices=["openai", "anthropic", "gemini"])
    count.add_argument("--request", metavar="FILE", help="a provider request body (JSON) to count, or -")
    count.add_argument("--strict", action="store_true", help="refuse unknown models instead of estimating")
    count.add_argument("--config")
    count.add_argument("file", nargs="?", help="text file to count, or - for stdin")
    count.set_defaults(func=_cmd_count)

    price = sub.add_parser("price", help="price a usage (tokens in the record's normalised meaning)")
    price.add_argument("--model", required=True)
    price.add_argument("--provider", choices=["openai", "anthropic", "gemini"])
    price.add_argument("--config")
    price.add_argument(
        "--input", type=int, default=0, help="all input tokens, cache reads and writes included"
    )
    price.add_argument("--output", type=int, default=0, help="all output tokens, reasoning included")
    price.add_argument("--cache-read", type=int, default=0)
    price.add_argument("--cache-write", type=int, default=0, help="all cache-write tokens")
    price.add_argument("--cache-write-1h", type=int, default=0, help="of --cache-write, the 1-hour ones")
    price.add_argument("--reasoning", type=int, default=None, help="of --output, the reasoning ones")
    price.add_argument("--input-audio", type=int, default=0, help="of --input, the audio ones")
    price.add_argument("--output-audio", type=int, default=0, help="of --output, the audio ones")
    price.add_argument("--service-tier", help="batch, flex, priority, ... (default: standard)")
    price.set_defaults(func=_cmd_price)

    report = sub.add_parser(
        "report", help="cost table from JSON-lines usage records (files, .gz, or - for stdin)"
    )
    report.add_argument("files", nargs="*", help="record files (plain or gzip); - or nothing: stdin")
    report.add_argument(
        "--by", action="append", metavar="KEY",
        help="group by provider, model, endpoint, day, hour or tag:<key> (repeat or comma-separate; "
        "default: provider,model)",
    )  # fmt: skip
    report.add_argument("--since", help="only records at or after this ISO date/time (UTC unless given)")
    report.add_argument("--until", help="only records before this ISO date/time")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON: totals and groups")
    output.add_argument("--csv", action="store_true", help="CSV, one row per group")
    report.add_argument(
        "--plot", metavar="PNG", help="also draw hourly cost per model (needs llmtally[plot])"
    )
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"llmtally: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
