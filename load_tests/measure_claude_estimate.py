"""How far the uncalibrated Claude estimate (o200k_base x 1.2) is from a reference Claude tokenizer.

The only Claude tokenizer available offline is the legacy (pre-Claude-3) one, whose counts the
reference corpus (tests/data) holds, so this is a stand-in measurement: it shows the estimator's
spread across kinds of text, not its error on Claude 3+, which needs real usage (the proxy's
calibration learns that factor per model family in production).

Run: .venv/bin/python load_tests/measure_claude_estimate.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from llmtally.counters import AnthropicCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.counters.corpus
from tests.counters.corpus import REFS, TEXTS


def main() -> None:
    counter = AnthropicCounter()
    errors: list[float] = []
    total_est = total_ref = 0
    for name, ref in sorted(REFS.items()):
        if not ref["claude_legacy"]:
            continue
        estimate = counter.count_text("claude-sonnet-5", [TEXTS[name]]).input_tokens
        errors.append((estimate - ref["claude_legacy"]) / ref["claude_legacy"])
        total_est += estimate
        total_ref += ref["claude_legacy"]
    deciles = statistics.quantiles(errors, n=10)
    print(f"texts: {len(errors)} (corpus, against the legacy Claude tokenizer)")
    median = statistics.median(errors)
    print(f"relative error: median {median:+.1%}, p10 {deciles[0]:+.1%}, p90 {deciles[-1]:+.1%}")
    median_abs = statistics.median(abs(e) for e in errors)
    print(f"median |error| {median_abs:.1%}; whole corpus {(total_est - total_ref) / total_ref:+.1%}")


if __name__ == "__main__":
    main()
