"""One hot account through the engine while decisions are held (the barrier's `cut` behind the stream).

    python -m benchmarks.whale benchmarks/out/chaos2-<ts> [--account acct-000000] [--lag 150] [--batch 40]

Reads a chaos run's events.jsonl and rules.yaml, keeps the account's events (group calls left out:
fit is given as traits), and feeds them to `Engine.step` in batches with a cut `--lag` seconds
behind the newest event time, as a partition behind a held barrier would. Prints the engine time,
the decisions made, the peak and final state size and what waits.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from detectors.engine import Engine
from schemas.events import Group, parse_event
from schemas.rules import load_rules
from schemas.state import AccountState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="a chaos run's output directory")
    ap.add_argument("--account", default="acct-000000")
    ap.add_argument("--lag", type=float, default=150.0, help="seconds the cut trails the stream")
    ap.add_argument("--batch", type=int, default=40, help="events per step (an envelope's share)")
    a = ap.parse_args()
    engine = Engine(load_rules(a.run / "rules.yaml"))
    tag = f'"{a.account}'.encode()
    events = []
    for line in (a.run / "events.jsonl").open("rb"):
        if tag in line:
            try:
                e = parse_event(line)
            except ValueError:
                continue
            if engine.relevant(e) and not isinstance(e, Group):
                events.append(e)
    state = AccountState(account_id=a.account, newest=events[0].ms, pruned_at=events[0].ms,
                         traits={"employees": 150})
    stream = decided = peak = size = 0
    started = time.perf_counter()
    for i in range(0, len(events), a.batch):
        chunk = events[i:i + a.batch]
        stream = max([stream] + [e.ms for e in chunk])
        state, obs, out = engine.step(state, chunk, a.account, lambda _: None, cut=stream - int(a.lag * 1000))
        decided += len(out)
        size = len(state.model_dump_json(exclude_defaults=True))
        peak = max(peak, size)
    took = time.perf_counter() - started
    print(f"{a.account}: {len(events):,} events, cut {a.lag:g} s behind: {took:.2f} s, {decided:,} outputs, "
          f"state peak {peak / 1024:.0f} KB, final {size / 1024:.0f} KB, waiting {len(state.waiting):,}, "
          f"reach {sum(len(r) for r in state.reach.values()):,}")


if __name__ == "__main__":
    main()
