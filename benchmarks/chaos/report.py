"""Expected (from `pql replay`) against what the chaos run saw: the figures and the table."""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Outcome:
    seed: int
    events: int
    rate: float
    duration: float
    faults: Counter = field(default_factory=Counter)
    rows: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)  # kind -> exp, seen, dup, miss, extra
    alerts: tuple[int, int] = (0, 0)            # expected, delivered
    dlq: tuple[int, int, int] = (0, 0, 0)       # expected rejects, distinct rejects seen, DLQ records
    recovery: dict[str, list[float]] = field(default_factory=dict)  # fault kind -> seconds per fault
    alert_delays: list[float] = field(default_factory=list)  # per alert held by an endpoint fault (alert_delays)
    divergent: tuple[int, int] = (0, 0)          # missing handoffs: account handed off by another event / not at all
    caught_up: float = 0.0                      # last fault over -> last handoff from before it seen
    exits: list[str] = field(default_factory=list)
    rss: tuple[float, float, float] = (0.0, 0.0, 0.0)  # MiB: max in the first minute, last minute, overall
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (not self.exits and all(r[2] == 0 and r[3] == 0 and r[4] == 0 for r in self.rows.values())
                and self.alerts[1] >= self.alerts[0] and self.dlq[0] == self.dlq[1] and self.caught_up <= 30
                and p99(self.alert_delays) <= 30)


KINDS = [("pql.handoff", "handoffs"), ("pql.sla_breached", "SLA breaches"), ("pql.milestone", "milestones"),
         ("pql.stage", "stage events")]


def compare(expected: dict[str, str], obs) -> dict[str, tuple[int, int, int, int, int]]:
    """Per CloudEvent type: expected, seen (distinct), duplicated, missing, unexpected."""
    rows = {}
    for kind, _ in KINDS:
        want = {i for i, k in expected.items() if k == kind}
        seen = obs.ids(kind)
        dup = sum(1 for i in seen if obs.counts[i] > 1)
        rows[kind] = (len(want), len(seen & want), dup, len(want - seen), len(seen - want))
    return rows


def late_after(end: float, times: dict[str, float], first: dict[str, float]) -> float:
    """Seconds from `end` until every output due by then was out (`times`: id -> event time;
    `first`: id -> wall clock first seen). Outputs never seen are left out: the rows count them."""
    due = [i for i, t in times.items() if t <= end and i in first]
    return max(0.0, max((first[i] - end for i in due), default=0.0))


def divergent(expected: dict[str, tuple[str, str]], obs) -> tuple[int, int]:
    """Expected handoffs not seen: (their account got a handoff from another qualifying event,
    their account got none). `expected`: id -> (type, account)."""
    handed = {obs.subject[i] for i in obs.ids("pql.handoff")}
    missing = [acct for i, (k, acct) in expected.items() if k == "pql.handoff" and i not in obs.first]
    return sum(1 for a in missing if a in handed), sum(1 for a in missing if a not in handed)


def recovery(faults, times: dict[str, float], first: dict[str, float]) -> dict[str, list[float]]:
    """Per fault kind, `late_after` the end of each fault."""
    out: dict[str, list[float]] = {}
    for f in faults:
        if f.ended is not None:
            out.setdefault(f.kind, []).append(late_after(f.ended, times, first))
    return out


def alert_delays(faults, delivered: dict[str, float], published: dict[str, float]) -> list[float]:
    """Seconds from the end of an endpoint fault until each alert it held was delivered. Held: on Kafka
    (`published`: id -> wall clock, alerted ids only) after the previous endpoint fault ended and
    before this one did, and not delivered by then (those published later, e.g. late after a worker
    SIGKILL, never met the fault). A later endpoint fault's time is not counted. Never delivered: inf."""
    down = sorted((f.started, f.ended) for f in faults if f.ended is not None)
    out, previous = [], float("-inf")
    for _, end in down:
        for i, at in published.items():
            done = delivered.get(i, float("inf"))
            if previous < at <= end and done > end:
                out.append(done - end - sum(max(0.0, min(b, done) - max(a, end)) for a, b in down if a > end))
        previous = end
    return out


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else 0.0


def seconds(xs: list[float]) -> str:
    """p50 / max; "never" when something due was still missing at the end."""
    if not xs:
        return "-"
    return " / ".join("never" if x == float("inf") else f"{x:.1f}" for x in (statistics.median(xs), max(xs)))


def table(runs: list[Outcome]) -> str:
    """The markdown table of all runs, one column per run."""
    head = "| | " + " | ".join(f"seed {r.seed}" for r in runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    lines = [("input", lambda r: f"{r.events:,} events, {r.rate:,.0f}/s, {r.duration:.0f} s")]
    kinds = sorted({k for r in runs for k in r.faults})
    lines.append(("faults injected", lambda r: ", ".join(f"{r.faults[k]} {k}" for k in kinds if r.faults[k])))
    for kind, label in KINDS:
        lines.append((f"{label}: expected / seen / duplicated / missing / unexpected",
                      lambda r, k=kind: " / ".join(f"{x:,}" for x in r.rows[k])))
    lines.append(("missing handoffs: account handed off by another event / not at all",
                  lambda r: f"{r.divergent[0]:,} / {r.divergent[1]:,}"))
    lines.append(("alerts: expected / delivered (at least once)", lambda r: f"{r.alerts[0]:,} / {r.alerts[1]:,}"))
    lines.append(("rejected inputs: expected / in DLQ (distinct) / DLQ records",
                  lambda r: " / ".join(f"{x:,}" for x in r.dlq)))
    for kind in sorted({k for r in runs for k in r.recovery}):
        lines.append((f"recovery after {kind}, s (p50 / max)", lambda r, k=kind: seconds(r.recovery.get(k, []))))
    lines.append(("alerts held by an endpoint fault: delivered after it recovered, s (n, p50 / p99 / max)",
                  lambda r: f"{len(r.alert_delays):,}, " + (" / ".join("never" if x == float("inf") else f"{x:.1f}" for x in (
                      statistics.median(r.alert_delays), p99(r.alert_delays), max(r.alert_delays))) if r.alert_delays else "-")))
    lines.append(("caught up after the last fault, s", lambda r: seconds([r.caught_up])))
    lines.append(("worker exits we did not cause", lambda r: str(len(r.exits))))
    lines.append(("worker RSS, MiB: first minute / last minute / max",
                  lambda r: " / ".join(f"{x:.0f}" for x in r.rss)))
    lines.append(("verdict", lambda r: "pass" if r.ok() else "**fail**"))
    return head + "".join(f"| {name} | " + " | ".join(fn(r) for r in runs) + " |\n" for name, fn in lines)


def again(run_dir: str) -> str:
    """Recovery and missing-handoff rows recomputed from a run's saved files (expected.jsonl,
    seen.jsonl, events.jsonl and the fault log in outcome.md)."""
    import json
    import re
    from pathlib import Path

    from detectors.timefmt import parse_ms

    d = Path(run_dir)
    expected = {x["id"]: (x["type"], parse_ms(x["time"]) / 1000, x.get("subject", ""))
                for x in map(json.loads, d.joinpath("expected.jsonl").read_text().splitlines())}
    seen = [json.loads(x) for x in d.joinpath("seen.jsonl").read_text().splitlines()]
    first = {x["event"]["id"]: x["seen"] for x in seen}
    handed = {x["event"]["subject"] for x in seen if x["event"]["type"] == "pql.handoff"}
    t0 = parse_ms(json.loads(d.joinpath("events.jsonl").open().readline())["timestamp"]) / 1000
    out = {i: t for i, (k, t, _) in expected.items() if k in ("pql.handoff", "pql.sla_breached")}
    rec: dict[str, list[float]] = {}
    ends = []
    for kind, at, took in re.findall(r"^(\w+) at \+(\d+)s.*?took ([\d.]+)s", d.joinpath("outcome.md").read_text(), re.M):
        if not kind.startswith("alerts"):
            ends.append(t0 + float(at) + float(took))
            rec.setdefault(kind, []).append(late_after(ends[-1], out, first))
    missing = [a for i, (k, _, a) in expected.items() if k == "pql.handoff" and i not in first]
    lines = [f"| recovery after {k}, s (p50 / max) | {seconds(v)} |" for k, v in sorted(rec.items())]
    lines.append(f"| caught up after the last fault, s | {seconds([late_after(max(ends), out, first)])} |")
    lines.append(f"| missing handoffs: account handed off by another event / not at all | "
                 f"{sum(a in handed for a in missing)} / {sum(a not in handed for a in missing)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for run in sys.argv[1:]:
        print(run, again(run), sep="\n")
