"""How far a cell's added p99 moves with the rounds it pools: is a run's p99 pinned down?

Reads the per-round latencies ``run.py --samples-out FILE`` writes. For each cell and target it gives
the added p99 (target minus direct) over all of the cell's rounds, then the spread of that same
number when only ``k`` of the rounds, drawn at random, are pooled (as a run with ``--rounds k``
would have measured it): the 5th to 95th percentile over draws, and how often it came out above
the limit.

    .venv/bin/python load_tests/run.py --concurrency 16 --rates "" --modes json --llmtally-workers 1 \\
        --no-litellm --floor --open-streams 0 --p99-rounds 12 --samples-out /tmp/samples.jsonl
    .venv/bin/python load_tests/p99_spread.py /tmp/samples.jsonl --pool 3,6
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

from run import pct  # the run's own percentile, so "all rounds" equals the run's added p99

Cell = tuple[str, str, str]


def read_rounds(path: Path) -> dict[Cell, dict[str, list[list[float]]]]:
    """cell → target → each round's latencies, in the order measured."""
    rounds: dict[Cell, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as lines:
        for line in lines:
            row = json.loads(line)
            rounds[(row["provider"], row["mode"], row["load"])][row["target"]].append(row["latency_ms"])
    return rounds


def added_p99(target: list[list[float]], direct: list[list[float]], picked: list[int]) -> float:
    mine = pct([x for i in picked for x in target[i]], 0.99)
    theirs = pct([x for i in picked for x in direct[i]], 0.99)
    assert mine is not None and theirs is not None, "a round without calls"
    return mine - theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("samples", type=Path)
    parser.add_argument("--pool", default="3,6", help="round counts to draw")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--limit", type=float, default=2.0, help="added p99 limit, ms")
    args = parser.parse_args()
    pools = [int(k) for k in args.pool.split(",") if k]
    rng = random.Random(1)  # the same draws every time: the table is reproducible from the file
    for (provider, mode, load), targets in read_rounds(args.samples).items():
        direct = targets.get("direct")
        if direct is None:
            continue
        total = len(direct)
        print(f"{provider} {mode} {load}: {total} rounds")
        for name, rounds in targets.items():
            if name == "direct" or len(rounds) != total:
                continue
            every = added_p99(rounds, direct, list(range(total)))
            parts = [f"  {name:14} all {total}: {every:+.2f}"]
            for k in pools:
                if k >= total:
                    continue
                picks = (rng.sample(range(total), k) for _ in range(args.draws))
                draws = sorted(added_p99(rounds, direct, picked) for picked in picks)
                low, high = draws[len(draws) // 20], draws[-(len(draws) // 20) - 1]
                over = sum(d > args.limit for d in draws) / len(draws)
                parts.append(f"{k} rounds: {low:+.2f} .. {high:+.2f} (> {args.limit:g} ms in {over:.0%})")
            print(" | ".join(parts))


if __name__ == "__main__":
    main()
