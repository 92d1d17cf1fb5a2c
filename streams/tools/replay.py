"""`pql replay`: the backtest. Runs the live engine over a JSONL file, in file order.

Events are read as a partition delivers them. Output (stdout) is one CloudEvent per line and is
byte-identical for the same input; the summary and per-line rejections go to stderr. With `now`
(`--now`), the SLA clocks are read at that time after the last event: every handoff due by then
gives its pql.sla_breached, as the live worker publishes it. Sales responses (`--responses`, the
records of `sales.responses`) are applied in time order among the events: a response is applied
before the first event later than it (an answer after its handoff's SLA ran out counts as late,
after the breach, when `now` is given).

Backfill (PQL_ALERT_MAX_AGE, docs/sales.md): a handoff is decided at the stream time, as if each event
had been processed when it happened, unless `processed_at` (`--processed-at`) says when a worker
started over this history; one whose qualifying event is older than the max age then is flagged
`backfill` and gets no SLA clock.

Wrong clocks (detectors/clock.py): an event dated more than `max_future` (`--max-future`,
PQL_MAX_FUTURE) ahead of its `receivedAt`, else of `processed_at`, is corrected by its `sentAt` or
refused `future`, as the worker does with its wall clock.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from pydantic import ValidationError

from detectors import identity, sales
from detectors.clock import check_future
from detectors.engine import Engine, Observation
from detectors.settle import Waiting
from schemas.cloudevents import HANDOFF, SLA_BREACHED, SUPPRESSED
from schemas.events import InvalidEvent, parse_event
from schemas.mql import MqlRecord
from schemas.sales import SalesResponse, problem
from schemas.state import AccountState, UserState

SHOW_LINES = 20  # line numbers listed per invalid reason in the summary


@dataclass
class Summary:
    lines: int = 0
    by_type: Counter = field(default_factory=Counter)
    invalid: dict[str, list[int]] = field(default_factory=dict)
    unattributed: int = 0
    held: int = 0
    duplicates: int = 0
    clock_corrected: int = 0
    too_late: int = 0
    diverged: Counter = field(default_factory=Counter)
    milestones: Counter = field(default_factory=Counter)
    qualifications: int = 0
    handoffs: int = 0
    backfill: int = 0
    suppressed: Counter = field(default_factory=Counter)
    muted: int = 0
    stages: Counter = field(default_factory=Counter)
    responses: Counter = field(default_factory=Counter)
    accounts: int = 0
    seconds: float = 0.0

    def render(self) -> str:
        valid = sum(self.by_type.values())
        bad = sum(len(v) for v in self.invalid.values())
        rate = self.lines / self.seconds if self.seconds else 0.0
        out = [
            f"events read:     {self.lines} ({valid} valid, {bad} invalid) in {self.seconds:.2f}s, {rate:,.0f}/s",
            "by type:         " + _counts(self.by_type),
        ]
        for reason, lines in sorted(self.invalid.items()):
            shown = ", ".join(map(str, lines[:SHOW_LINES])) + (", ..." if len(lines) > SHOW_LINES else "")
            out.append(f"invalid {reason}: {len(lines)} (lines {shown})")
        out += [
            f"unattributed:    {self.unattributed}",
            f"held at end:     {self.held} (no group call for their user yet)",
            f"duplicates:      {self.duplicates}",
            *([f"clock corrected: {self.clock_corrected} (device clock ahead; sentAt showed the skew)"]
              if self.clock_corrected else []),
            f"too late:        {self.too_late}",
            *(["diverged:        " + _counts(self.diverged)] if self.diverged else []),
            "milestones:      " + _counts(self.milestones),
            f"qualifications:  {self.qualifications}",
            f"handoffs:        {self.handoffs}" + (f" ({self.backfill} backfill)" if self.backfill else ""),
            "suppressed:      " + _counts(self.suppressed),
            *([f"muted:           {self.muted} (suppressions after a handoff's first: not published)"]
              if self.muted else []),
            "stages:          " + _counts(self.stages),
            *(["responses:       " + _counts(self.responses)] if self.responses else []),
            f"accounts:        {self.accounts}",
        ]
        return "\n".join(out)


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


class MqlFileError(ValueError):
    pass


def load_mql(path: str | Path) -> dict[str, MqlRecord]:
    """Read `{"account_id","stage","owner"}` lines; a bad line stops with its number and field."""
    records: dict[str, MqlRecord] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = MqlRecord.model_validate_json(raw)
            except ValidationError as err:
                e = err.errors(include_url=False)[0]
                where = ".".join(str(p) for p in e["loc"]) or "line"
                raise MqlFileError(f"{path}:{n}: {where}: {e['msg']}") from None
            records[rec.account_id] = rec
    return records


def load_responses(path: str | Path, err: IO[str]) -> list[tuple[int, SalesResponse]]:
    """(line number, response) in time order (file order among equal times). A bad line is reported
    on `err` with its number and field and left out, as the worker dead-letters it."""
    found: list[tuple[int, SalesResponse]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                found.append((n, SalesResponse.model_validate_json(raw)))
            except ValidationError as bad:
                err.write(f"responses line {n}: bad_response: {problem(bad)}\n")
    return sorted(found, key=lambda x: x[1].ms)


class Replay:
    """The replay loop; holds identity links and account states in plain dicts."""

    def __init__(self, engine: Engine, mql: dict[str, MqlRecord], milestones: bool = False, stages: bool = False,
                 responses: list[tuple[int, SalesResponse]] = (), now: int | None = None,
                 processed_at: int | None = None, max_future: int = 3_600_000):
        self.engine = engine
        self.max_future = max_future
        self.mql = mql
        self.milestones = milestones
        self.stages = stages
        rules = engine.rules
        self.identity = identity.Users(rules.hold, rules.bound)
        self.users: dict[str, UserState] = {}
        self.states: dict[str, AccountState] = {}
        self.clocks: sales.Clocks = {}
        self.summary = Summary()
        self.responses, self.next_response, self.now = list(responses), 0, now
        self.processed_at = processed_at
        self.settle, self.stream, self.waiting = rules.settle, 0, Waiting()

    def switch(self, engine: Engine) -> None:
        """Decide with these rules from now on; state is kept (a worker restarted with new rules)."""
        self.engine = engine
        rules = engine.rules
        self.identity = identity.Users(rules.hold, rules.bound)
        self.settle = rules.settle

    def feed(self, lineno: int, raw: bytes, out: IO[str], err: IO[str]) -> None:
        s = self.summary
        s.lines += 1
        try:
            event = parse_event(raw)
            s.clock_corrected += check_future(event, self.processed_at, self.max_future)
        except InvalidEvent as bad:
            s.invalid.setdefault(bad.reason, []).append(lineno)
            err.write(f"line {lineno}: {bad.reason}: {bad.detail}\n")
            return
        s.by_type[event.type] += 1
        if self.next_response < len(self.responses):
            self.answers(event.ms, out, err)
        lines, why_not = identity.dispatch(event, self.engine.relevant)
        if why_not is not None:
            s.unattributed += why_not == identity.UNATTRIBUTED
            return
        if len(lines) == 1 and lines[0][0] == identity.EVENT:  # most lines: one event for its account
            self.apply(lines[0][1], [event], lineno, out, err)
            return
        by_account: dict = {}
        _, dropped = self.identity.run_all(lines, self._user, by_account)
        s.unattributed += dropped
        for account, (events, marks) in by_account.items():  # what one input line brings to an account, together
            self.apply(account, events, lineno, out, err, marks)

    def _user(self, key: str) -> UserState:
        return self.users.get(key) or self.users.setdefault(key, UserState(key=key))

    def apply(self, account: str, events: list, lineno: int, out: IO[str], err: IO[str], marks: list = ()) -> None:
        for e in events:
            if e.ms > self.stream:
                self.stream = e.ms
        cut = self.stream - self.settle
        state, obs, outputs = self.engine.step(self.states.get(account), events, account, self.mql.get, cut, marks,
                                               self.decided_at())
        self.states[account] = state
        self._report(account, state, obs, outputs, lineno, out, err)
        self.release(cut, out, err)

    def release(self, cut: int | None, out: IO[str], err: IO[str]) -> None:
        """Decide what waits (rules `settle`) at or before `cut` (everything when None), by position."""
        if not self.waiting.accounts:
            return
        for ms, account in self.waiting.ready(cut):
            state = self.states[account]
            obs = Observation()
            outputs = self.engine.decide_all(state, self.engine.due(state, account, cut, obs), self.mql.get, obs,
                                             self.decided_at())
            self._report(account, state, obs, outputs, 0, out, err)

    def decided_at(self) -> int:
        """The clock a decision is made at (backfill flags): `processed_at` (a worker started then over
        this history), else the stream time, as if each event was processed as it happened."""
        return self.processed_at if self.processed_at is not None else self.stream

    def _report(self, account: str, state: AccountState, obs: Observation, outputs: list, lineno: int,
                out: IO[str], err: IO[str]) -> None:
        self.waiting.track(account, state)
        s = self.summary
        s.duplicates += obs.duplicates
        s.too_late += len(obs.too_late)
        s.diverged.update(obs.diverged)
        s.muted += obs.muted
        for event in obs.too_late:
            err.write(f"line {lineno}: too_late: event {event.messageId} at {event.timestamp.isoformat()} is more than "
                      f"the rules' lateness + hold behind account {account}'s newest event\n")
        for m in obs.milestones:
            s.milestones[m.data.milestone] += 1
            if self.milestones:
                out.write(m.to_json() + "\n")
        for ev in outputs:
            if ev.type in (HANDOFF, SUPPRESSED):
                s.qualifications += 1
                if ev.type == HANDOFF:
                    s.handoffs += 1
                    s.backfill += ev.data.backfill
                    if not ev.data.backfill:  # a backlog handoff gets no SLA clock
                        h = sales.last(state)
                        self.clocks[h.id] = [h.due, account]
                else:
                    s.suppressed[ev.data.reason] += 1
                out.write(ev.to_json() + "\n")
                continue
            s.stages[ev.data.stage] += 1
            if self.stages:
                out.write(ev.to_json() + "\n")

    def answers(self, until: int | None, out: IO[str], err: IO[str]) -> None:
        """Apply the responses timed up to `until` (all that are left when None)."""
        while self.next_response < len(self.responses):
            n, r = self.responses[self.next_response]
            if until is not None and r.ms > until:
                return
            self.next_response += 1
            if self.waiting.accounts:
                self.release(r.ms - self.settle, out, err)  # handoffs published by the time of the answer
            state = self.states.get(r.account_id)
            if state is None:
                outcome, events = "unknown_handoff", []
            else:  # (an answer after the SLA ran out breaches it first, in the core)
                events, outcome = sales.respond(state, r)
            self.summary.responses[outcome] += 1
            if outcome == "unknown_handoff":
                err.write(f"responses line {n}: unknown_handoff: handoff_id {r.handoff_id} is not among "
                          f"account {r.account_id}'s recent handoffs\n")
                continue
            self.clocks.pop(r.handoff_id, None)  # any answer stops the clock
            for ev in events:
                self.summary.stages[ev.data.stage] += 1
                if self.stages or ev.type == SLA_BREACHED:
                    out.write(ev.to_json() + "\n")

    def _breach(self, handoff_id: str, account: str, now: int, out: IO[str]) -> None:
        del self.clocks[handoff_id]
        for ev in sales.breach(self.states[account], handoff_id, now):
            self.summary.stages[ev.data.stage] += 1
            out.write(ev.to_json() + "\n")

    def breaches(self, now: int, out: IO[str]) -> None:
        for handoff_id, account in sales.due(self.clocks, now):
            self._breach(handoff_id, account, now, out)


def replay(lines: Iterable[bytes], engine: Engine, mql: dict[str, MqlRecord], out: IO[str], err: IO[str],
           milestones: bool = False, progress=None, stages: bool = False, now: int | None = None,
           responses: list[tuple[int, SalesResponse]] = (), processed_at: int | None = None,
           max_future: int = 3_600_000, switches: dict[int, Engine] | None = None) -> Summary:
    """`switches`: {line: engine}: from that line on, decide with that engine's rules (a rules deploy)."""
    r = Replay(engine, mql, milestones, stages, responses, now, processed_at, max_future)
    started = time.perf_counter()
    for n, raw in enumerate(lines, 1):
        if switches and n in switches:
            r.switch(switches[n])
        if raw.strip():
            r.feed(n, raw, out, err)
        if progress is not None and n % 8192 == 0:
            progress(n)
    r.release(None, out, err)  # the end of the input: nothing earlier can come
    r.answers(now, out, err)
    if now is not None:
        r.breaches(now, out)
    r.summary.accounts = len(r.states)
    r.summary.held = sum(len(u.held) for u in r.users.values())
    r.summary.seconds = time.perf_counter() - started
    return r.summary


def run(events: str, engine: Engine, mql: dict[str, MqlRecord], milestones: bool, stages: bool = False,
        now: int | None = None, responses: list[tuple[int, SalesResponse]] = (), processed_at: int | None = None,
        max_future: int = 3_600_000, switches: dict[int, Engine] | None = None) -> Summary:
    """Replay a file to stdout/stderr, with a progress bar when stderr is a terminal."""
    out, err = sys.stdout, sys.stderr
    return over_file(events, "replay", err.isatty(), lambda f, progress: replay(
        f, engine, mql, out, err, milestones, progress, stages, now, responses, processed_at, max_future, switches))


def over_file(path: str, label: str, bar: bool, work: Callable[[IO[bytes], Callable[[int], None] | None], Any]) -> Any:
    """`work(file, progress)` over the opened file; with `bar`, a progress bar on stderr that follows
    the file position (`progress` is called every few thousand lines), else `progress` is None."""
    with open(path, "rb") as f:
        if not bar:
            return work(f, None)
        import click

        with click.progressbar(length=Path(path).stat().st_size, label=label, file=sys.stderr) as shown:
            last = [0]

            def progress(_n: int) -> None:
                pos = f.tell()
                shown.update(pos - last[0])
                last[0] = pos

            return work(f, progress)
