"""Milestone detectors: does this event reach the milestone, and with what evidence?

Each detector owns the ``hits`` rows its milestone needs (see schemas/state.py) and keeps only
what its window needs: windowed kinds keep rows no older than ``within`` behind the newest row;
unwindowed counts keep the last ``count`` rows (one per distinct value when ``distinct`` is set).
Windows are closed at both ends: an event exactly ``within`` before another is inside.
"""
from __future__ import annotations

import hashlib
from bisect import insort
from typing import Any

from detectors.conditions import MISSING, compile_conditions, getter
from detectors.timefmt import iso
from schemas.rules import Milestone
from schemas.state import Evidence

MAX_ROWS = 1000  # hard cap per milestone and account, whatever the window


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def distinct_key(value: Any) -> str:
    """Short stable hash: distinct values (often e-mail addresses) are never stored as written."""
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


class Detector:
    def __init__(self, mid: str, rule: Milestone):
        self.id = mid
        self.rule = rule
        self.kind = rule.kind
        self.type = rule.type
        self.names = frozenset(rule.names)
        self.description = rule.description or mid.replace("_", " ")
        self.where = compile_conditions(rule.where)
        self.within = rule.within
        self.count = rule.count
        self.distinct = getter(rule.distinct) if rule.distinct else None
        # properties worth showing as evidence: what `where` and `ratio` look at
        paths = list(rule.where) + ([rule.ratio.of, rule.ratio.to] if rule.ratio else [])
        self.shown = [(p, getter(p)) for p in paths]
        if rule.ratio:
            self.of, self.to = getter(rule.ratio.of), getter(rule.ratio.to)
            self.at_least = rule.ratio.at_least

    def matches(self, event: Any) -> bool:
        return event.name in self.names and self.where(event)

    def _props(self, event: Any) -> dict[str, Any]:
        out = {}
        for path, get in self.shown:
            v = get(event)
            if v is not MISSING:
                out[path] = v
        return out

    def apply(self, rows: list[list[Any]], event: Any, ms: int) -> list[Evidence] | None:
        """Record a matching event; return the evidence if it reaches the milestone, else None."""
        if self.kind == "ratio":
            of, to = _number(self.of(event)), _number(self.to(event))
            if of is None or not to or to <= 0 or of / to < self.at_least:
                return None
            return [_evidence([ms, event.messageId, event.name, None, self._props(event)])]
        key = None
        if self.distinct is not None:
            value = self.distinct(event)
            if value is MISSING or value is None:
                return None  # nothing to count distinctly
            key = distinct_key(value)
        row = [ms, event.messageId, event.name, key, self._props(event)]
        if self.within is not None and rows and rows[-1][0] > ms:
            insort(rows, row, key=_time)  # keep event-time order; equal times keep arrival order
        else:
            rows.append(row)
        if self.kind == "sequence":
            return self._sequence(rows, ms)
        return self._count(rows, ms)

    def _count(self, rows: list[list[Any]], ms: int) -> list[Evidence] | None:
        if self.within is None:
            if self.distinct is not None:  # keep the latest row per distinct value
                latest = {r[3]: r for r in rows}
                rows[:] = sorted(latest.values(), key=lambda r: r[0])
            del rows[: max(0, len(rows) - self.count)]
            inside = rows
        else:
            self._trim(rows)
            lo = ms - self.within
            inside = [r for r in rows if lo <= r[0] <= ms]
        if self.distinct is not None:
            inside = sorted({r[3]: r for r in inside}.values(), key=lambda r: r[0])
        if len(inside) < self.count:
            return None
        return [_evidence(r) for r in inside[-max(self.count, 10):]]

    def _sequence(self, rows: list[list[Any]], ms: int) -> list[Evidence] | None:
        self._trim(rows)
        lo, steps, step, found = ms - self.within, self.rule.sequence, 0, []
        for r in rows:
            if r[0] < lo or r[0] > ms:
                continue
            if r[2] == steps[step]:
                found.append(r)
                step += 1
                if step == len(steps):
                    return [_evidence(x) for x in found]
        return None

    def _trim(self, rows: list[list[Any]]) -> None:
        lo = rows[-1][0] - self.within  # rows are in event-time order
        if rows[0][0] < lo or len(rows) > MAX_ROWS:
            rows[:] = [r for r in rows if r[0] >= lo][-MAX_ROWS:]

    def expire(self, rows: list[list[Any]], newest: int) -> None:
        """Drop rows no window can need any more (called on the account's expiry sweep)."""
        if self.within is not None and rows:
            lo = newest - self.within
            rows[:] = [r for r in rows if r[0] >= lo]


def _time(row: list[Any]) -> int:
    return row[0]


def _evidence(row: list[Any]) -> Evidence:
    return Evidence(messageId=row[1], event=row[2], timestamp=iso(row[0]), properties=row[4] or {})
