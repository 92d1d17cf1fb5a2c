"""`pql backtest`: what a rule change would do, side by side, before it ships.

Both rule files run over the same history with the live engine (`streams/tools/replay.py`, one
`Replay` per rule file, fed each line in one pass over the file). Counted per ISO week of the
qualifying event, and in total: qualifications, handoffs by lane and precedence, suppressions by
reason, accounts gained and lost by the candidate (with what each side decided for them), the median
time from an account's first relevant event to its first handoff, SLA clocks started per lane, and,
with past sales responses, what sales made of the candidate's accounts under the current rules (a
precision estimate). `render_text` is the terminal table, `report` the JSON; streams/tools/
backtest_html.py draws the HTML report.
"""
from __future__ import annotations

import json
import statistics
import textwrap
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterable

from detectors.timefmt import iso, parse_ms
from schemas.cloudevents import HANDOFF, SUPPRESSED
from schemas.rules import Rules
from schemas.sales import SalesResponse
from streams.tools.replay import Replay, Summary

SHOWN = 10  # gained/lost accounts listed in the terminal table (all are in --json and --html)


class _Lines:
    """An output sink that keeps the handoffs and suppressions (the only lines replay writes here)."""

    def __init__(self):
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)


class _Quiet:
    def write(self, s: str) -> None:
        pass


class _Recording(Replay):
    """A replay that also keeps each account's first relevant (non-group) event time."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.first: dict[str, int] = {}

    def apply(self, account, events, lineno, out, err, marks=()):
        times = [e.ms for e in events if e.type != "group"]
        if times and (account not in self.first or min(times) < self.first[account]):
            self.first[account] = min(times)
        super().apply(account, events, lineno, out, err, marks)


@dataclass
class Side:
    """What one rule file decided over the history."""

    label: str
    path: str
    version: str
    sla: dict[str, int]                     # lane -> SLA (ms)
    decisions: list[dict] = field(default_factory=list)   # handoffs and suppressions (CloudEvents as dicts)
    first: dict[str, int] = field(default_factory=dict)
    summary: Summary | None = None

    def handoffs(self) -> list[dict]:
        return [d for d in self.decisions if d["type"] == HANDOFF]

    def accounts(self) -> dict[str, dict]:
        """account -> its first handoff in the period."""
        out: dict[str, dict] = {}
        for h in self.handoffs():
            out.setdefault(h["subject"], h)
        return out


def week(ms: int) -> str:
    y, w, _ = datetime.fromtimestamp(ms / 1000, timezone.utc).isocalendar()
    return f"{y}-W{w:02d}"


def run(lines: Iterable[bytes], current: tuple[str, Rules], candidate: tuple[str, Rules],
        engine_of: Callable[[Rules], Any], mql: dict, responses: list[tuple[int, SalesResponse]] = (),
        period: tuple[int | None, int | None] = (None, None), progress: Callable[[int], None] | None = None) -> dict:
    """Both rule files over `lines` in one pass; the report (a JSON-ready dict)."""
    started = time.perf_counter()
    sides, replays, sinks = [], [], []
    for label, (path, rules) in (("current", current), ("candidate", candidate)):
        sides.append(Side(label, path, rules.version, rules.sla.model_dump()))
        # sales answered the current rules' handoffs: only they can take the responses
        replays.append(_Recording(engine_of(rules), mql, responses=responses if label == "current" else ()))
        sinks.append(_Lines())
    quiet = _Quiet()
    n = 0
    for n, raw in enumerate(lines, 1):
        if raw.strip():
            for r, sink in zip(replays, sinks):
                r.feed(n, raw, sink, quiet)
        if progress is not None and n % 8192 == 0:
            progress(n)
    for side, r, sink in zip(sides, replays, sinks):
        r.release(None, sink, quiet)
        r.answers(None, sink, quiet)
        r.summary.accounts = len(r.states)
        side.summary, side.first = r.summary, r.first
        lo, hi = period
        for line in sink.lines:
            d = json.loads(line)
            if d["type"] in (HANDOFF, SUPPRESSED):
                ms = parse_ms(d["time"])
                if (lo is None or ms >= lo) and (hi is None or ms < hi):
                    side.decisions.append(d)
    return report(sides, responses, n, time.perf_counter() - started, period)


def _counts(decisions: list[dict]) -> dict:
    handoffs = [d for d in decisions if d["type"] == HANDOFF]
    return {
        "qualifications": len(decisions),
        "handoffs": len(handoffs),
        "by_lane": dict(sorted(Counter(d["data"]["lane"] for d in handoffs).items())),
        "by_precedence": dict(sorted(Counter(d["data"]["precedence"] for d in handoffs).items())),
        "suppressed": dict(sorted(Counter(d["data"]["reason"] for d in decisions if d["type"] == SUPPRESSED).items())),
        "sla_clocks": dict(sorted(Counter(d["data"]["lane"] for d in handoffs if not d["data"]["backfill"]).items())),
    }


def _median_hours(side: Side, handed: dict[str, dict]) -> float | None:
    waits = [parse_ms(h["time"]) - side.first[a] for a, h in handed.items() if a in side.first]
    return round(statistics.median(waits) / 3_600_000, 2) if waits else None


def _outcome(mine: list[dict]) -> str:
    """What a side decided for an account (its decisions): handed off, suppressed (reason), or not qualified."""
    if any(d["type"] == HANDOFF for d in mine):
        return "handed off"
    if mine:
        return "suppressed: " + ", ".join(sorted({d["data"]["reason"] for d in mine}))
    return "not qualified"


def _account_row(account: str, handoff: dict, other: dict[str, list[dict]]) -> dict:
    data = handoff["data"]
    return {"account": account, "qualified_at": handoff["time"], "score": data["score"],
            "milestones": data["milestones"], "other_side": _outcome(other.get(account, [])),
            "evidence": {m: [e["event"] + " " + e["timestamp"] for e in ev[-3:]] for m, ev in data["evidence"].items()}}


def _precision(accounts: Iterable[str], answers: dict[str, SalesResponse]) -> dict:
    c: Counter = Counter()
    for a in accounts:
        r = answers.get(a)
        c["not answered" if r is None else (f"rejected: {r.reason}" if r.status == "rejected" else r.status)] += 1
    good = c["accepted"] + c["converted"]
    judged = good + sum(v for k, v in c.items() if k.startswith("rejected"))
    return {"outcomes": dict(sorted(c.items())), "precision": round(good / judged, 3) if judged else None}


def report(sides: list[Side], responses: list[tuple[int, SalesResponse]], lines: int, seconds: float,
           period: tuple[int | None, int | None]) -> dict:
    weeks: dict[str, dict] = defaultdict(dict)
    for side in sides:
        by_week: dict[str, list] = defaultdict(list)
        for d in side.decisions:
            by_week[week(parse_ms(d["time"]))].append(d)
        for w, ds in by_week.items():
            weeks[w][side.label] = _counts(ds)
    empty = _counts([])
    got = {s.label: s.accounts() for s in sides}
    decided: dict[str, dict[str, list[dict]]] = {s.label: defaultdict(list) for s in sides}
    for s in sides:
        for d in s.decisions:
            decided[s.label][d["subject"]].append(d)
    gained = sorted(set(got["candidate"]) - set(got["current"]))
    lost = sorted(set(got["current"]) - set(got["candidate"]))
    answers: dict[str, SalesResponse] = {}
    for _, r in responses:  # time order: the latest answer per account wins
        answers[r.account_id] = r
    out = {
        "lines": lines, "seconds": round(seconds, 2),
        "period": {"from": iso(period[0]) if period[0] is not None else None,
                   "to": iso(period[1]) if period[1] is not None else None},
        "sides": {s.label: {"rules": s.path, "version": s.version, "sla_hours": {k: v / 3_600_000 for k, v in s.sla.items()},
                            "total": _counts(s.decisions), "accounts_handed_off": len(got[s.label]),
                            "accounts_with_relevant_events": len(s.first),
                            "median_hours_to_first_handoff": _median_hours(s, got[s.label])} for s in sides},
        "weeks": {w: {s.label: weeks[w].get(s.label, empty) for s in sides} for w in sorted(weeks)},
        "gained": [_account_row(a, got["candidate"][a], decided["current"]) for a in gained],
        "lost": [_account_row(a, got["current"][a], decided["candidate"]) for a in lost],
    }
    if responses:
        out["responses"] = {s.label: _precision(got[s.label], answers) for s in sides}
    return out


# -- the terminal table (80 columns) ------------------------------------------------------------------

def _row(name: str, a: Any, b: Any, change: str = "") -> str:
    return f"{name[:34]:<34}{_fmt(a):>14}{_fmt(b):>14}{change:>14}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        d = b - a
        return f"{d:+,.1f}" if isinstance(d, float) else f"{d:+,}"
    return ""


def render_text(rep: dict, out: IO[str]) -> None:
    cur, cand = rep["sides"]["current"], rep["sides"]["candidate"]
    w = out.write
    w(f"pql backtest: {rep['lines']:,} lines in {rep['seconds']:.1f} s")
    if rep["period"]["from"] or rep["period"]["to"]:
        w(f", qualifications from {rep['period']['from'] or 'the start'} to {rep['period']['to'] or 'the end'}")
    w("\n")
    w(f"  current:   {cur['rules']} (version {cur['version']})\n  candidate: {cand['rules']} (version {cand['version']})\n\n")
    w(_row("", "current", "candidate", "change") + "\n")
    rows = [("qualifications", "qualifications"), ("handoffs", "handoffs")]
    for name, key in rows:
        a, b = cur["total"][key], cand["total"][key]
        w(_row(name, a, b, _delta(a, b)) + "\n")
    for group, title in (("by_lane", "  lane"), ("by_precedence", "  "), ("suppressed", "suppressed: ")):
        for k in sorted(set(cur["total"][group]) | set(cand["total"][group])):
            a, b = cur["total"][group].get(k, 0), cand["total"][group].get(k, 0)
            w(_row(f"{title}{' ' if title == '  lane' else ''}{k}", a, b, _delta(a, b)) + "\n")
    a, b = cur["accounts_handed_off"], cand["accounts_handed_off"]
    w(_row("accounts handed off", a, b, _delta(a, b)) + "\n")
    a, b = cur["median_hours_to_first_handoff"], cand["median_hours_to_first_handoff"]
    w(_row("median h, first event -> handoff", a, b, _delta(a, b)) + "\n")
    for lane in sorted(set(cur["total"]["sla_clocks"]) | set(cand["total"]["sla_clocks"])):
        a, b = cur["total"]["sla_clocks"].get(lane, 0), cand["total"]["sla_clocks"].get(lane, 0)
        w(_row(f"SLA clocks, {lane} ({cand['sla_hours'].get(lane, 0):g} h)", a, b, _delta(a, b)) + "\n")
    if "responses" in rep:
        a, b = rep["responses"]["current"]["precision"], rep["responses"]["candidate"]["precision"]
        w(_row("precision (accepted+converted)", _pct(a), _pct(b)) + "\n")
        outcomes = rep["responses"]["candidate"]["outcomes"]
        text = "what sales made of the candidate's accounts: " + ", ".join(f"{k} {v}" for k, v in outcomes.items())
        w(textwrap.fill(text, 80, initial_indent="  ", subsequent_indent="    ") + "\n")
    w(f"\naccounts gained by the candidate: {len(rep['gained'])}, lost: {len(rep['lost'])}\n")
    w(f"  {'account':<16} {'qualified':<10} pts {'milestones':<27} {'other rules'}\n")
    for title, rows_ in (("gained", rep["gained"]), ("lost", rep["lost"])):
        for r in rows_[:SHOWN]:
            other = r["other_side"].removeprefix("suppressed: ")
            w(f"{'+' if title == 'gained' else '-'} {r['account'][:16]:<16} {r['qualified_at'][:10]} {r['score']:>3} "
              f"{_cut('+'.join(r['milestones']), 27):<27} {other[:16]}\n")
        if len(rows_) > SHOWN:
            w(f"  ... {len(rows_) - SHOWN} more {title} (--json or --html lists them all)\n")
    w("\nhandoffs per week        current  candidate   change\n")
    for wk, v in rep["weeks"].items():
        a, b = v["current"]["handoffs"], v["candidate"]["handoffs"]
        w(f"  {wk:<20}{a:>10,}{b:>11,}{_delta(a, b):>9}\n")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"
