"""Bounded disorder: `pql replay` of a simulated file and of the same lines, each moved by up to
`--shift` positions, must give the same handoffs (issue 11's measurement). Run with the shipped
rules (`settle: 0s`) and with each `--settle` given (default 2h, more than the disorder made here).

    python -m benchmarks.disorder [--accounts 2000] [--events 200000] [--seed 3] [--shift 2000]
                                  [--late-group 0] [--settle 2h ...]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import time
from pathlib import Path

from detectors.engine import Engine
from schemas.events import InvalidEvent, parse_event
from schemas.rules import load_rules, parse_wait
from streams.tools.replay import replay
from streams.tools.simulate import Simulator

ROOT = Path(__file__).resolve().parent.parent


def shuffle_bounded(lines: list[bytes], shift: int, seed: int) -> list[bytes]:
    """Each line moves by at most `shift` positions (sort by position + a random offset below shift)."""
    rng = random.Random(seed)
    return [x for _, x in sorted(((i + rng.random() * shift, x) for i, x in enumerate(lines)), key=lambda t: t[0])]


def decisions(lines: list[bytes], settle: str = "0s") -> tuple[dict[str, str], object, float]:
    out = io.StringIO()
    rules = load_rules(ROOT / "examples/rules.yaml")
    rules = rules.model_copy(update={"settle": parse_wait(settle)})
    started = time.perf_counter()
    summary = replay(lines, Engine(rules), {}, out, io.StringIO())
    took = time.perf_counter() - started
    found = {}
    for line in out.getvalue().splitlines():
        ev = json.loads(line)
        found[ev["id"]] = line
    return found, summary, took


def span_of_disorder(lines: list[bytes], moved: list[bytes]) -> float:
    """Hours of event time: the largest amount by which a line's event time is behind one read before it."""
    worst, newest = 0, 0
    for raw in moved:
        try:
            ms = parse_event(raw).ms
        except InvalidEvent:  # what replay rejects
            continue
        worst, newest = max(worst, newest - ms), max(newest, ms)
    return worst / 3_600_000


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=2000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--shift", type=int, default=2000)
    ap.add_argument("--late-group", type=float, default=0.0)
    a, _ = ap.parse_known_args()
    ap.add_argument("--settle", nargs="*", default=["2h"])
    a, _ = ap.parse_known_args()
    lines = list(Simulator(accounts=a.accounts, seed=a.seed, late_group=a.late_group).events(a.events))
    moved = shuffle_bounded(lines, a.shift, a.seed)
    print(f"{a.events} events, {a.accounts} accounts, seed {a.seed}, late_group {a.late_group}; each line moved by up "
          f"to {a.shift} positions (event-time disorder up to {span_of_disorder(lines, moved):.1f} h)")
    res = {}
    for settle in ["0s", *a.settle]:
        want, s1, t1 = decisions(lines, settle)
        got, s2, t2 = decisions(moved, settle)
        handoffs = lambda d: {i for i, x in d.items() if '"pql.handoff"' in x}
        differ_ids = handoffs(want) ^ handoffs(got)
        differ_bytes = sum(1 for i in handoffs(want) & handoffs(got) if want[i] != got[i])
        res[settle] = {"handoffs": len(handoffs(want)), "handoffs_moved": len(handoffs(got)),
                       "differing_ids": len(differ_ids), "differing_bytes": differ_bytes, "decisions": len(want),
                       "decisions_moved": len(got), "too_late": s2.too_late, "diverged": dict(s2.diverged),
                       "replay_eps": s1.lines / t1}
        print(f"settle {settle}:")
        print(f"  in order : {len(handoffs(want))} handoffs, {len(want)} decisions ({s1.lines / t1:,.0f} events/s)")
        print(f"  disorder : {len(handoffs(got))} handoffs, {len(got)} decisions ({s2.lines / t2:,.0f} events/s); "
              f"too late {s2.too_late}; diverged {dict(s2.diverged) or 'none'}")
        print(f"  handoff ids differing: {len(differ_ids)}; same id, other bytes: {differ_bytes}")
    return res


if __name__ == "__main__":
    main()
