"""Replay throughput vs bare JSON parsing, on the same synthetic lines, in one run.

    python -m benchmarks.replay_bench [--events 1000000] [--accounts 50000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import time
from pathlib import Path

from detectors.engine import Engine
from schemas.rules import load_rules
from streams.tools.replay import replay
from streams.tools.simulate import Simulator

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def dataset(events: int, accounts: int) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"sim-{events}-{accounts}.jsonl"
    if not path.exists():
        with open(path.with_suffix(".tmp"), "wb") as f:
            for line in Simulator(accounts=accounts, seed=1).events(events):
                f.write(line + b"\n")
        os.replace(path.with_suffix(".tmp"), path)
    return path


def json_only(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            try:
                json.loads(line)
            except ValueError:
                pass
    return time.perf_counter() - started


def dataset_of_args() -> tuple[argparse.Namespace, Path]:
    """--events / --accounts of the command line (other arguments are the caller's) and that dataset."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--accounts", type=int, default=50_000)
    a, _ = ap.parse_known_args()
    return a, dataset(a.events, a.accounts)


def replay_only(path: Path) -> tuple[float, object, int]:
    engine = Engine(load_rules(ROOT / "examples/rules.yaml"))
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with open(path, "rb") as f:
        summary = replay(f, engine, {}, out, err)
    return time.perf_counter() - started, summary, len(out.getvalue().splitlines())


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--accounts", type=int, default=50_000)
    a = ap.parse_args()
    path = dataset(a.events, a.accounts)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    j = min(json_only(path) for _ in range(2))
    r, summary, outputs = replay_only(path)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = summary.lines
    res = {
        "events": n, "accounts": summary.accounts, "outputs": outputs,
        "json_loads_eps": n / j, "replay_eps": n / r, "ratio": r / j,
        "rss_growth_mib": (rss1 - rss0) / 1024, "bytes_per_account": (rss1 - rss0) * 1024 / max(summary.accounts, 1),
    }
    print(f"json.loads only : {n / j:>10,.0f} events/s ({j:.2f}s)")
    print(f"pql replay      : {n / r:>10,.0f} events/s ({r:.2f}s)  -> {r / j:.2f}x the JSON-parse time (target <= 2x)")
    print(f"outputs {outputs}, accounts {summary.accounts}, peak RSS growth {res['rss_growth_mib']:.0f} MiB "
          f"(~{res['bytes_per_account']:,.0f} bytes/account incl. dedupe + windows)")
    return res


if __name__ == "__main__":
    main()
