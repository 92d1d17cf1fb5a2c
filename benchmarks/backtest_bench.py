"""`pql backtest` over 1M events (two rules files, one pass) beside one `pql replay` of the same file.

    python -m benchmarks.backtest_bench [--events 1000000] [--accounts 50000]
"""
from __future__ import annotations

import io
import re
import time

from benchmarks.replay_bench import ROOT, dataset_of_args
from detectors.engine import Engine
from schemas.rules import Rules, load_rules
from streams.tools import backtest as bt
from streams.tools.replay import replay


def candidate(current: Rules) -> Rules:
    """The example rules with two invites instead of three and a score of 80 (as in docs/backtest.md)."""
    text = (ROOT / "examples/rules.yaml").read_text()
    text = re.sub(r"^(\s+count:) 3$", r"\1 2", text, flags=re.M)
    text = re.sub(r"^(\s+score:) 60", r"\1 80", text, flags=re.M)
    path = ROOT / "benchmarks" / "out" / "candidate.yaml"
    path.write_text(text.replace(f'version: "{current.version}"', 'version: "candidate"'))
    return load_rules(path)


def main() -> dict:
    a, path = dataset_of_args()
    current = load_rules(ROOT / "examples/rules.yaml")
    cand = candidate(current)
    started = time.perf_counter()
    with open(path, "rb") as f:
        replay(f, Engine(current), {}, io.StringIO(), io.StringIO())
    one = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as f:
        rep = bt.run(f, ("current", current), ("candidate", cand), Engine, {})
    both = time.perf_counter() - started
    n = rep["lines"]
    print(f"pql replay, one rules file     : {one:6.1f} s ({n / one:,.0f} events/s)")
    print(f"pql backtest, two rules files  : {both:6.1f} s ({n / both:,.0f} events/s), {both / one:.2f}x one replay "
          f"(target: 1M events well under a minute); handoffs {rep['sides']['current']['total']['handoffs']:,} / "
          f"{rep['sides']['candidate']['total']['handoffs']:,}")
    return {"replay_s": one, "backtest_s": both, "events": n}


if __name__ == "__main__":
    main()
