"""``llmtally serve | health | demo | count | price | report``.

Every error a user can cause is one line on stderr, ``llmtally <command>: <what is wrong>``, and the
exit status docs/cli.md gives: 2 for bad arguments, configuration or input, 1 when the answer is
"no" (no price, not healthy, no records). Never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import orjson

from llmtally.config import Config, ConfigError, load_config


class CommandError(Exception):
    """A user error: ``message`` goes to stderr after the command's name, ``status`` is the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = getattr(args, "config", None) or os.environ.get("LLMTALLY_CONFIG")
    if path is None and Path("config.toml").is_file():
        path = "config.toml"
    return path


def _config_from(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _read_input(source: str | None) -> bytes:
    """The bytes of ``source`` (a path, or ``-``/None for stdin)."""
    if source in (None, "-"):
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {source}: {exc.strerror or exc}") from None


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
    if not url.startswith(("http://", "https://")):
        raise CommandError(f"--url {url!r}: not an http:// or https:// URL")
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except urllib.error.HTTPError as exc:
        raise CommandError(f"{url}: HTTP {exc.code}", status=1) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CommandError(f"{url}: {getattr(exc, 'reason', exc)}", status=1) from None
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from llmtally.demo import run_demo

    return run_demo()


def _cmd_count(args: argparse.Namespace) -> int:
    from llmtally.counters import TokenizerUnavailable
    from llmtally.providers import ADAPTERS
    from llmtally.tracker import TokenCountParams, TokenTracker, UnknownModelError

    tracker = TokenTracker(_config_from(args), strict=args.strict)
    if args.request and args.file:
        raise CommandError(f"give either --request or a text file, not both ({args.file!r})")
    source = args.request or args.file
    data = _read_input(source)
    name = "stdin" if source in (None, "-") else source
    try:
        if args.request:
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise CommandError(f"{name} is not JSON: {exc}") from None
            if not isinstance(payload, dict):
                kind = type(payload).__name__.replace("dict", "object").replace("list", "array")
                raise CommandError(f"{name} is not a request body: a JSON object is needed, got {kind}")
            model = args.model or payload.get("model")
            if not isinstance(model, str) or not model:
                raise CommandError('the request names no model (a "model" string); pass --model')
            provider = tracker.provider_of(model, args.provider)
            endpoint = ADAPTERS[provider].endpoint_for_request(payload, model)
            count = tracker.counters[provider].count_request(model, endpoint.name, payload)
        else:
            if not args.model:
                raise CommandError("--model is required to count a text (or pass --request FILE)")
            model = args.model
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CommandError(f"{name} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
            provider = tracker.provider_of(model, args.provider)
            count = tracker.count_tokens(TokenCountParams(model=model, text=text, provider=args.provider))
    except (UnknownModelError, TokenizerUnavailable) as exc:
        raise CommandError(str(exc)) from None
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
    _check_token_counts(args)
    provider = args.provider or infer_provider(args.model)
    if provider is None:  # no provider, so no price: exit 1 as for any model without a price
        raise CommandError(
            f"no price for model {args.model!r}: cannot tell its provider; pass --provider", status=1
        )
    usage = TokenUsage(
        input_tokens=args.input,
        output_tokens=args.output,
        cache_read_tokens=args.cache_read,
        cache_write_tokens=args.cache_write,
        cache_write_1h_tokens=args.cache_write_1h,
        reasoning_tokens=args.reasoning,
        input_audio_tokens=args.input_audio,
        output_audio_tokens=args.output_audio,
        input_image_tokens=args.input_image,
        output_image_tokens=args.output_image,
    )
    try:
        book = PriceBook(config.pricing)
    except PriceFileError as exc:
        raise CommandError(f"prices file error: {exc}") from None
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


#: (part, whole): the part's tokens are counted inside the whole's, so it cannot be larger.
_TOKEN_PARTS = (
    ("cache_read", "input"),
    ("cache_write", "input"),
    ("cache_write_1h", "cache_write"),
    ("input_audio", "input"),
    ("reasoning", "output"),
    ("output_audio", "output"),
    ("input_image", "input"),
    ("output_image", "output"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_token_counts(args: argparse.Namespace) -> None:
    """Token counts in the record's meaning: parts fit inside their wholes (negatives: the parser)."""
    for part, whole in _TOKEN_PARTS:
        value, limit = getattr(args, part) or 0, getattr(args, whole)
        if value > limit:
            raise CommandError(
                f"{_flag(part)} {value} is more than {_flag(whole)} {limit}: "
                f"{_flag(part)} counts part of {_flag(whole)}"
            )
    if args.cache_read + args.cache_write > args.input:
        raise CommandError(
            f"--cache-read {args.cache_read} + --cache-write {args.cache_write} is more than --input "
            f"{args.input}: --input counts cache reads and writes too"
        )


def _cmd_report(args: argparse.Namespace) -> int:
    from llmtally.pipeline import report as r

    by = [b for item in (args.by or []) for b in item.split(",") if b] or list(r.DEFAULT_GROUPING)
    read = r.ReadCount()
    try:
        for key in by:
            r.group_value({}, key)  # a bad --by is refused before any reading
        since, until = r.parse_when(args.since, "--since"), r.parse_when(args.until, "--until")
        if args.source:
            if args.files:
                raise CommandError("give record files or --from, not both")
            records = _stored_records(args.source, since, until)
        else:
            records = list(r.read_records(args.files, count=read))
        if not records and not args.source:
            sources = ", ".join(args.files) if args.files and args.files != ["-"] else "stdin"
            raise CommandError(
                f"read {read.lines} line{'' if read.lines == 1 else 's'} from {sources}, none of them a "
                'usage record (a JSON line with "event": "llm.usage"; llmtally serve writes them to '
                "stdout, its diagnostics to stderr)",
                status=1,
            )
        totals, groups = r.build_report(records, by, since, until)
        if args.plot:
            kept = [rec for rec in records if _in_window(rec, since, until)]
            r.plot_cost_over_time(kept, args.plot)
    except r.ReportError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # the plot could not be written
        raise CommandError(f"--plot {args.plot}: {exc.strerror or exc}") from None
    if args.json:
        sys.stdout.write(r.render_json(totals, groups, by))
    elif args.csv:
        sys.stdout.write(r.render_csv(groups, by))
    else:
        sys.stdout.write(r.render_table(totals, groups, by))
    return 0


def _stored_records(dsn: str, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """``report --from``: the records [sinks.postgres] stored, as the JSON lines would give them."""
    import asyncio

    if not dsn.startswith(("postgresql://", "postgres://")):
        raise CommandError("--from: expected a postgresql://user:password@host:port/database URL")
    from llmtally.pipeline import postgres

    where = postgres.redacted(dsn)  # never the password
    try:
        records, some = asyncio.run(postgres.fetch_records(dsn, since, until))
    except ImportError:
        raise CommandError("--from needs asyncpg: pip install 'llmtally[postgres]'") from None
    except LookupError:
        message = f"{where}: no table {postgres.TABLE} (nothing stored there: [sinks.postgres] creates it)"
        raise CommandError(message, status=1) from None
    except (OSError, TimeoutError, ValueError) as exc:
        raise CommandError(f"{where}: {exc or type(exc).__name__}") from None
    except Exception as exc:  # asyncpg's: a wrong password, no such database, …
        raise CommandError(f"{where}: {type(exc).__name__}: {exc}") from None
    if not some:
        raise CommandError(f"{where}: table {postgres.TABLE} holds no usage record", status=1)
    return records


def _in_window(record: dict[str, object], since: object, until: object) -> bool:
    from llmtally.pipeline.report import parse_when

    when = parse_when(str(record.get("timestamp")), "timestamp")
    return when is not None and not (since and when < since) and not (until and when >= until)  # type: ignore[operator]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmtally", description="LLM usage metering proxy and library.")
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
        "--input", type=_non_negative, default=0, help="all input tokens, cache reads and writes included"
    )
    price.add_argument(
        "--output", type=_non_negative, default=0, help="all output tokens, reasoning included"
    )
    price.add_argument("--cache-read", type=_non_negative, default=0)
    price.add_argument("--cache-write", type=_non_negative, default=0, help="all cache-write tokens")
    price.add_argument(
        "--cache-write-1h", type=_non_negative, default=0, help="of --cache-write, the 1-hour ones"
    )
    price.add_argument(
        "--reasoning", type=_non_negative, default=None, help="of --output, the reasoning ones"
    )
    price.add_argument("--input-audio", type=_non_negative, default=0, help="of --input, the audio ones")
    price.add_argument("--output-audio", type=_non_negative, default=0, help="of --output, the audio ones")
    price.add_argument("--input-image", type=_non_negative, default=0, help="of --input, the image ones")
    price.add_argument("--output-image", type=_non_negative, default=0, help="of --output, the image ones")
    price.add_argument("--service-tier", help="batch, flex, priority, ... (default: standard)")
    price.set_defaults(func=_cmd_price)

    report = sub.add_parser(
        "report", help="cost table from JSON-lines usage records (files, .gz, or - for stdin)"
    )
    report.add_argument("files", nargs="*", help="record files (plain or gzip); - or nothing: stdin")
    report.add_argument(
        "--from", dest="source", metavar="DSN",
        help="read the records [sinks.postgres] stored in this database (postgresql://…) instead of files",
    )  # fmt: skip
    report.add_argument(
        "--by", action="append", metavar="KEY",
        help="group by provider, platform, model, item, endpoint, batch_id, day, hour or tag:<key> "
        "(repeat or comma-separate; default: provider,model)",
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
    except CommandError as exc:
        print(f"llmtally {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"llmtally: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `llmtally report | head`: the reader left; nothing more to say
        sys.stderr.close()
        return 0
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
