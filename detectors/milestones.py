"""Milestone detectors: does the milestone hold at a position, and with what evidence?

Each detector owns the ``hits`` rows of its milestone (see schemas/state.py), kept in position
order ``(ms, messageId)``. ``holds(rows, i)`` evaluates the milestone with its window ending at row
``i``, seeing only rows at or before it: exactly what a replay of the time-sorted stream sees when
it reaches that event, whatever order the rows arrived in. Windows are closed at both ends: an
event exactly ``within`` before another is inside.

Rows are kept as long as a late event can still need them (``keep``): for windowed kinds, ``within``
behind the oldest position a late event may take (``cut``); for unwindowed counts, every row from
``cut`` on plus the ``count`` latest before it.
"""
from __future__ import annotations

import hashlib
import json
from bisect import bisect_left, bisect_right
from typing import Any

from detectors.conditions import MISSING, compile_conditions, getter, number
from detectors.timefmt import iso
from schemas.rules import Milestone
from schemas.state import Evidence

MAX_ROWS = 1000  # hard cap per milestone and account, whatever the window
PROP_MAX = 256  # characters of an evidence value kept per row


def _number(v: Any) -> float | None:
    """A finite number or numeric string ("80"), else None (NaN compares false with everything: it
    would pass `at_least`)."""
    return number(v)


def distinct_key(value: Any) -> str:
    """Short stable hash: distinct values (often e-mail addresses) are never stored as written."""
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def _short(v: Any) -> Any:
    """An evidence value as kept in state: numbers, booleans and short strings as they are; a long
    string cut at PROP_MAX characters; an object or list only if its JSON is short (state stays bounded)."""
    if isinstance(v, str):
        return v if len(v) <= PROP_MAX else v[:PROP_MAX] + "…"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return v if len(text) <= PROP_MAX else text[:PROP_MAX] + "…"
    return v


def _person(event: Any) -> Any:
    """`distinct: userId`: the call's user, else its anonymousId (seat growth)."""
    return event.userId or event.anonymousId or MISSING


def position(row: list[Any]) -> tuple[int, str]:
    return row[0], row[1]


def _ms(row: list[Any]) -> int:
    return row[0]


def signature(rule: Milestone) -> str:
    """What a milestone's kept rows and reaches depend on, as "<matching>.<holding>" (two short
    hashes): which events make rows and what a row holds (type, names, where, distinct, ratio), then
    when the rows make it hold (count, within, the sequence's order). Points and description are in
    neither: they change no row or reach (docs/operations.md "Changing rules")."""
    def h(*parts: Any) -> str:
        return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()

    ratio = rule.ratio.model_dump() if rule.ratio else None
    growth = rule.growth.model_dump() if rule.growth else None
    return (h(rule.type, sorted(rule.names), rule.where, rule.distinct, ratio) + "."
            + h(rule.count, rule.within, rule.sequence, growth))


class Detector:
    def __init__(self, mid: str, rule: Milestone):
        self.id = mid
        self.rule = rule
        self.signature = signature(rule)
        self.kind = rule.kind
        self.type = rule.type
        self.names = frozenset(rule.names)
        self.description = rule.description or mid.replace("_", " ")
        self.where = compile_conditions(rule.where)
        self.within = rule.within
        self.count = rule.count
        self.fades = rule.fades
        self.growth = rule.growth
        if rule.growth:  # rows are looked at two windows back
            self.within = 2 * rule.growth.over
        self.distinct = (_person if rule.distinct == "userId" else getter(rule.distinct)) if rule.distinct else None
        # properties worth showing as evidence: what `where` and `ratio` look at
        paths = list(rule.where) + ([rule.ratio.of, rule.ratio.to] if rule.ratio else [])
        self.shown = [(p, getter(p)) for p in paths]
        if rule.ratio:
            self.of, self.to = getter(rule.ratio.of), getter(rule.ratio.to)
            self.at_least = rule.ratio.at_least

    def _props(self, event: Any) -> dict[str, Any]:
        out = {}
        for path, get in self.shown:
            v = get(event)
            if v is not MISSING:
                out[path] = _short(v)
        return out

    def row(self, event: Any) -> list[Any] | None:
        """The row a matching event adds, or None when it cannot count (ratio below its bar, no
        distinct value). A ratio milestone keeps only the events that reach it."""
        key = None
        if self.kind == "ratio":
            of, to = _number(self.of(event)), _number(self.to(event))
            if of is None or not to or to <= 0 or of / to < self.at_least:
                return None
        elif self.distinct is not None:
            value = self.distinct(event)
            if value is MISSING or value is None:
                return None  # nothing to count distinctly
            key = distinct_key(value)
        name = event.name if event.name is not None else event.type  # (an unnamed page call, for "*")
        return [event.ms, event.messageId, name, key, self._props(event)]

    def affected(self, rows: list[list[Any]], i: int) -> range:
        """Indexes of the rows whose outcome a row inserted at `i` can change."""
        if self.kind == "ratio":
            return range(i, i + 1)
        if self.within is None:
            return range(i, len(rows))
        end = bisect_right(rows, rows[i][0] + (self.growth.over if self.growth else self.within), key=_ms)
        return range(i, end)  # (a trend's row in a later position's earlier window cannot come: Rules)

    def holds(self, rows: list[list[Any]], i: int) -> list[Evidence] | None:
        """Evidence if the milestone holds at rows[i] (the window ends there), else None."""
        if self.kind == "ratio":
            return [_evidence(rows[i])]
        if self.growth is not None:
            return self._growth(rows, i)
        lo = 0 if self.within is None else bisect_left(rows, rows[i][0] - self.within, key=_ms)
        inside = rows[lo:i + 1]
        if self.kind == "sequence":
            return self._sequence(inside)
        if self.distinct is not None:  # the latest row per distinct value
            latest = {r[3]: r for r in inside}
            if len(latest) < self.count:
                return None
            inside = sorted(latest.values(), key=position)
        elif len(inside) < self.count:
            return None
        return [_evidence(r) for r in inside[-(self.count if self.within is None else max(self.count, 10)):]]

    def _growth(self, rows: list[list[Any]], i: int) -> list[Evidence] | None:
        """Reached at rows[i] when the window `over` ending there (closed) holds at least `min` and
        at least `at_least` times what the `over` before it holds (counts, or distinct values)."""
        g, t = self.growth, rows[i][0]
        mid = bisect_left(rows, t - g.over, key=_ms)
        lo = bisect_left(rows, t - 2 * g.over, key=_ms)
        now, before = rows[mid:i + 1], rows[lo:mid]
        if self.distinct is not None:
            n, m = len({r[3] for r in now}), len({r[3] for r in before})
        else:
            n, m = len(now), len(before)
        if n < g.min or n < g.at_least * m:
            return None
        return [_evidence(r) for r in now[-max(g.min, 10):]]

    def _sequence(self, inside: list[list[Any]]) -> list[Evidence] | None:
        steps, step, found = self.rule.sequence, 0, []
        for r in inside:
            if r[2] == steps[step]:
                found.append(r)
                step += 1
                if step == len(steps):
                    return [_evidence(x) for x in found]
        return None

    def reaches(self, rows: list[list[Any]]) -> list[list[Any]]:
        """Every kept row's position where the milestone holds (a holding change: count, within)."""
        return [list(position(r)) for j, r in enumerate(rows) if self.holds(rows, j) is not None]

    def keep(self, rows: list[list[Any]], cut: int) -> None:
        """Drop rows no event at or after `cut` can need (the expiry sweep). With `fades`, also the
        latest row before those: how long the account has gone without a matching event."""
        if not rows:
            return
        extra = 1 if self.fades is not None else 0
        if self.kind == "ratio":
            rows[:] = rows[max(0, bisect_left(rows, cut, key=_ms) - extra):]
        elif self.within is not None:
            rows[:] = rows[max(0, bisect_left(rows, cut - self.within, key=_ms) - extra):][-MAX_ROWS:]
        else:
            i = bisect_left(rows, cut, key=_ms)
            before = rows[:i]
            if self.distinct is not None:
                before = sorted({r[3]: r for r in before}.values(), key=position)
            rows[:] = (before[-self.count:] + rows[i:])[-MAX_ROWS:]


def _evidence(row: list[Any]) -> Evidence:
    return Evidence(messageId=row[1], event=row[2], timestamp=iso(row[0]), properties=row[4] or {})
