"""The detection engine: (account state, event) -> (account state, decisions). Pure.

No I/O, no wall clock: time is the event's own ``timestamp``; the MQL record comes in as a value.
It works in two steps so the live worker reads Redis only when an account qualifies:

    state, obs = engine.observe(state, event, account_id)    # milestones, maybe qualifications
                                                             # (observe_all: several events at once)
    for p in obs.qualified:
        state, decision, stages = engine.decide(state, p, mql_record)

Order independence (docs/semantics.md): events are ordered by position ``(ms, messageId)``.
An event is inserted at its position and every milestone is re-evaluated at each later position its
window reaches; a position qualifies when the points of the milestones holding within
``qualify.window`` before it reach ``qualify.score``. Holding only grows as events arrive, so each
position qualifies at most once, and the decision for it is the one a replay of the time-sorted
stream makes, with the same id and bytes, except in the cases ``Observation.diverged`` counts.
Events older than the account's newest minus ``lateness + hold`` are refused (``too_late``).

Settling (rules ``settle``): a qualified position waits in ``state.waiting`` until the caller's
``cut`` (its stream time minus ``settle``) passes it, and is decided then, with every event that
arrived by that time in place. So a late event that arrives within ``settle`` of stream time never
makes a divergence. ``cut=None`` decides at once; ``due`` decides what waits when no event comes.

Responses and SLA breaches (the sales side) are in detectors/sales.py.
The engine updates the state it is given in place and returns it.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from typing import Any, Callable

from detectors import sales
from detectors.conditions import MISSING, compile_conditions, getter
from detectors.identity import user_keys
from detectors.ids import event_id
from detectors.milestones import MAX_ROWS, Detector, position
from detectors.timefmt import iso, parse_ms
from schemas.cloudevents import (
    HANDOFF, MILESTONE, SUPPRESSED, CloudEvent, FitResult, HandoffData, MilestoneData, MqlContext, SuppressedData,
)
from schemas.events import Group
from schemas.mql import IN_SALES, OPEN_MQL, MqlRecord
from schemas.rules import Rules
from schemas.state import AccountState, Evidence, Handoff, Reach

MAX_CALLS = 50  # group calls kept one by one per account; older ones are merged into `traits`
MAX_EXPECT = 16  # group calls whose held events are tracked per account (docs/semantics.md)

# Why a published output can differ from a replay of the time-sorted stream (pql_divergence_total):
EARLIER_QUALIFICATION = "earlier_qualification"  # a late event qualified a position before a published handoff
LATE_EVIDENCE = "late_evidence"                  # a late event entered the window of a published decision
LATE_TRAITS = "late_traits"                      # a late group call predates a published handoff (fit, name)
DIVERGENCE = (EARLIER_QUALIFICATION, LATE_EVIDENCE, LATE_TRAITS)

Pos = tuple[int, str]


@dataclass(slots=True)
class Pending:
    """A position that has just qualified; `decide` turns it into a handoff or a suppression."""

    account_id: str
    ms: int
    message_id: str
    score: int
    milestones: list[str]
    refit: bool = False      # re-decided after a late group call: only a handoff is published
    diverged: str | None = None  # set by `decide` when it publishes nothing for EARLIER_QUALIFICATION
    mutes: int = 0               # set by `decide`: qualifications it muted (docs/semantics.md, one suppression
                                 # per handoff): this one, or those waiting behind the suppression it publishes


@dataclass(slots=True)
class Observation:
    duplicates: int = 0
    too_late: list = field(default_factory=list)               # the events refused as too late
    milestones: list[CloudEvent] = field(default_factory=list)
    qualified: list[Pending] = field(default_factory=list)     # in position order
    diverged: list[str] = field(default_factory=list)          # DIVERGENCE reasons
    refit: list[Pos] = field(default_factory=list)             # not_fit positions that fit after a late group call
    fresh: list = field(default_factory=list)                  # (position, milestone) rows of `fades` milestones inserted
    muted: int = 0                                             # qualifications not published (`decide`, muted)



def _bound(state: AccountState) -> None:
    """At most MAX_EXPECT entries: answered ones go first, then the oldest (apps send `group` every
    session; MARKs whose call never comes, e.g. a repeated LINK line)."""
    if len(state.expect) > MAX_EXPECT:
        del state.expect[min(state.expect, key=lambda c: (state.expect[c][1] != "", state.expect[c][0]))]

class Engine:
    def __init__(self, rules: Rules, alert_max_age: int | None = None):
        """`alert_max_age` (ms): a handoff whose qualifying event is older than this at the `now` its
        decision is made is a backfill: flagged, no alert, no SLA clock (None: never)."""
        self.rules = rules
        self.alert_max_age = alert_max_age
        self.detectors = [Detector(mid, m) for mid, m in rules.milestones.items()]
        self.by_id = {d.id: d for d in self.detectors}
        self.signatures = {d.id: d.signature for d in self.detectors}
        self.listening: dict[tuple[str, str], list[Detector]] = {}
        self.every: dict[str, list[Detector]] = {}  # call type -> detectors of `event: "*"`
        for d in self.detectors:
            for name in d.names:
                if name == "*":
                    self.every.setdefault(d.type, []).append(d)
                else:
                    self.listening.setdefault((d.type, name), []).append(d)
        self.bound = rules.bound
        self.window = rules.qualify.window
        fit = rules.fit.traits if rules.fit else None
        self.fit = compile_conditions(fit) if fit else None
        self.fit_traits = [(p, getter(p)) for p in fit] if fit else []

    # -- step 1: state -------------------------------------------------------------------------
    def relevant(self, event: Any) -> bool:
        """Can this event change any account's state? (Others need no state at all.)"""
        if isinstance(event, Group):
            return True
        name = event.name
        return event.type in self.every or (name is not None and (event.type, name) in self.listening)

    def observe(self, state: AccountState | None, event: Any, account_id: str,
                cut: int | None = None) -> tuple[AccountState, Observation]:
        return self.observe_all(state, [event], account_id, cut)

    def observe_all(self, state: AccountState | None, events: list, account_id: str,
                    cut: int | None = None, marks: list = ()) -> tuple[AccountState, Observation]:
        """Apply events of one account together, then evaluate: a burst of late events (held events
        released by a group call) is judged with all of them in place, as the sorted stream would.
        `marks` are the MARK lines that came with them (detectors/identity.py).
        `obs.qualified` holds the positions to decide now: those at or before `cut` (all if None)."""
        if state is None:
            first = events[0].ms if events else 0
            state = AccountState(account_id=account_id, newest=first, pruned_at=first)
        self.reconcile(state)
        obs = Observation()
        new: list[tuple[Pos, str]] = []
        # held events released by a group call come with its MARK lines, after their user key's
        # partition forwarded them: behind a backlog, weeks of the account's own events may have come
        # first. They count as they would have right after the call (its state is kept for them).
        released = [state.expect[m[0]][0] for m in marks if m[0] in state.expect and state.expect[m[0]][1]]
        floor = min(released) - self.rules.hold if released else None
        for event in events:
            if isinstance(event, Group):  # (repeats too: each comes with its LINK lines)
                self._expect(state, event.messageId, event.ms, "".join(k[0] for k in user_keys(event)))
            found = self._apply(state, event, account_id, obs, floor)
            for pos, mid in found:  # a pql.milestone waits like a decision: an earlier reach may still come;
                insort(state.waiting, [pos[0], pos[1], mid])  # waiting at once, so that a later event of
            new += found  # the batch, far ahead, cannot expire what its qualification is scored on
        for call, slot, ms in marks:
            self._expect(state, call, ms, None, slot)
        if new or obs.fresh:
            new.sort()
            self._qualify(state, account_id, new, obs)
        for p in obs.qualified:
            if self._muted(state, (p.ms, p.message_id)):
                obs.muted += 1  # its decision is known: muted (no need to wait, nor to keep what it needs)
            else:
                insort(state.waiting, [p.ms, p.message_id])
        silent = {(pos, mid) for pos, mid in new if not self._may_signal(state, pos, mid)}
        if silent:  # reaches whose pql.milestone is known to be none: they need not wait
            state.waiting[:] = [w for w in state.waiting if len(w) == 2 or ((w[0], w[1]), w[2]) not in silent]
        obs.qualified = self.due(state, account_id, cut, obs)
        for pos in obs.refit:  # scored with every event of the batch in place
            score, counted = self._score(state, pos)
            obs.qualified.append(Pending(account_id, pos[0], pos[1], score, counted, refit=True))
        obs.qualified.sort(key=lambda p: (p.ms, p.message_id))
        return state, obs

    @staticmethod
    def _expect(state: AccountState, call: str, ms: int, slots: str | None, mark: str = "") -> None:
        """A group call (its user-key `slots`) or a MARK of one slot. An entry [ms, pending, marked]
        lives from the call until its last MARK (or from an early MARK until the call), then stays,
        answered, until the account's state passes it: the ingest tier may send the account's line of
        a call again without its LINK (a batch half written when its worker was killed), and a
        repeat of an answered call must not wait for a MARK that never comes (cluster chaos seed 3,
        session 12: an account decided nothing more). A repeat whose LINK does come answers again."""
        e = state.expect.get(call)
        if slots is not None:
            pending = "".join(x for x in slots if e is None or x not in e[2])
            if pending:
                state.expect[call] = [ms, pending, e[2] if e is not None else ""]
                _bound(state)
        elif e is None or not e[1]:  # a MARK before its call, or of a call already answered: remember it
            if e is None:
                e = state.expect[call] = [ms, "", ""]
            e[2] = e[2].replace(mark, "") + mark
            _bound(state)
        else:
            e[1] = e[1].replace(mark, "")
            e[2] = e[2].replace(mark, "") + mark

    def due(self, state: AccountState, account_id: str, cut: int | None = None,
            obs: Observation | None = None) -> list[Pending]:
        """The waiting positions at or before `cut` (all if None), scored now, for `decide`; the
        milestone signals among them go to `obs.milestones`. While a group call's user keys have yet
        to release their held events, nothing (unless `cut` is None)."""
        if not state.waiting or (cut is not None and any(e[1] for e in state.expect.values())):
            return []
        self.reconcile(state)
        k = len(state.waiting) if cut is None else bisect_right(state.waiting, [cut, "\U0010ffff"])
        ready, state.waiting[:k] = state.waiting[:k], []
        pending = []
        for w in ready:
            if len(w) == 3:
                if obs is not None:
                    self._signal(state, account_id, (w[0], w[1]), w[2], obs)
            else:
                score, counted = self._score(state, (w[0], w[1]))
                if score >= self.rules.qualify.score:  # (fewer only after a rules change took points away)
                    pending.append(Pending(account_id, w[0], w[1], score, counted))
        return pending

    def reconcile(self, state: AccountState) -> None:
        """The account's milestones as these rules define them (docs/operations.md "Changing rules"):
        a milestone the rules no longer have, or whose matching changed, loses its rows and reaches
        (a changed one starts over, like a new one); one whose count, within or sequence order changed
        gets its reaches again from its kept rows (silently: what they find in the past is not
        signalled nor qualified), without its anchor. `defs` records what each was kept under; an
        entry missing (a state from before it was recorded) is taken as the current definition."""
        defs = state.defs
        held = state.hits.keys() | state.reach.keys() | state.anchor.keys()
        if defs.keys() == held and all(self.signatures.get(m) == s for m, s in defs.items()):
            return
        for mid in held | defs.keys():
            now, was = self.signatures.get(mid), defs.get(mid)
            if now is not None and was in (None, now):
                defs[mid] = now
                continue
            state.anchor.pop(mid, None)
            if now is not None and now.split(".")[0] == was.split(".")[0]:  # the same match: same rows
                reach = self.by_id[mid].reaches(state.hits.get(mid, []))
                if reach:
                    state.reach[mid] = reach
                else:
                    state.reach.pop(mid, None)
                defs[mid] = now
            else:  # gone from the rules, or matching other events now
                for part in (state.hits, state.reach, defs):
                    part.pop(mid, None)
            held_at = {tuple(r) for r in state.reach.get(mid, ())}
            state.waiting[:] = [w for w in state.waiting if len(w) == 2 or w[2] != mid or (w[0], w[1]) in held_at]
        for mid in [m for m in defs if m not in held]:
            del defs[mid]

    def _apply(self, state: AccountState, event: Any, account_id: str, obs: Observation,
               floor: int | None = None) -> list[tuple[Pos, str]]:
        """Insert one event; the positions where a milestone now holds and did not before. `floor`:
        held events released by a group call still expected count from `hold` before it."""
        ms = event.ms
        if ms < state.newest - self.bound and (floor is None or ms < floor):
            obs.too_late.append(event)
            return []
        if ms > state.newest:
            state.newest = ms
            if ms - state.pruned_at >= self.bound // 8:
                self._expire(state)
        if isinstance(event, Group):
            self._group_call(state, event, obs)
            return []
        new: list[tuple[Pos, str]] = []
        inserted = repeat = False
        listening = self.listening.get((event.type, event.name), ())
        if self.every and event.type in self.every:
            listening = [*listening, *self.every[event.type]]
        for d in listening:
            if d.where(event) and (row := d.row(event)) is not None:
                found = self._insert(state, d, row)
                if found is None:
                    repeat = True
                    continue
                new += found
                inserted = True
                if d.fades is not None:  # later positions may count its points again
                    obs.fresh.append(((row[0], row[1]), d.id))
        if inserted:
            self._late_evidence(state, ms, obs)
        elif repeat:
            obs.duplicates += 1
        return new

    def _insert(self, state: AccountState, d: Detector, row: list) -> list[tuple[Pos, str]] | None:
        """Insert a row; the positions where the milestone now holds and did not before. None if the
        row is there already: the rows are the dedupe memory (an event with the same timestamp and
        messageId is a repeat; a repeat of a row dropped by MAX_ROWS is older than every kept row, so
        it is dropped again at once)."""
        rows = state.hits.setdefault(d.id, [])
        if d.id not in state.defs:
            state.defs[d.id] = d.signature
        pos = position(row)
        i = bisect_left(rows, pos, key=position)
        if i < len(rows) and position(rows[i]) == pos:
            return None
        rows.insert(i, row)
        if len(rows) > MAX_ROWS:
            if i == 0:
                del rows[0]
                return []
            self._fold(state, d.id, rows)
            del rows[0]
            i -= 1
        reach = state.reach.setdefault(d.id, [])
        found = []
        for j in d.affected(rows, i):
            pos = position(rows[j])
            if _has(reach, pos):
                continue  # held there already (holding only grows)
            if d.holds(rows, j) is not None:
                insort(reach, list(pos), key=tuple)
                found.append((pos, d.id))
        if not reach:
            del state.reach[d.id]
        return found

    def _fold(self, state: AccountState, mid: str, rows: list[list[Any]]) -> None:
        """rows[0] is about to be dropped (MAX_ROWS): reaches at or before it become the anchor, so
        `reach` stays within the kept rows."""
        reach = state.reach.get(mid)
        k = bisect_right(reach, position(rows[0]), key=tuple) if reach else 0
        if k and state.waiting:  # a waiting position is decided later: keep the reaches it may look back to
            k = min(k, bisect_left(reach, tuple(state.waiting[0][:2]), key=tuple))
        if k:
            at, msg = reach[k - 1]
            state.anchor[mid] = Reach(at=at, message_id=msg, evidence=self._evidence_at(state, mid, (at, msg)))
            del reach[:k]

    def _group_call(self, state: AccountState, event: Group, obs: Observation) -> None:
        pos = (event.ms, event.messageId)
        before = self.traits_at(state, pos)
        if all(k in before and before[k] == v for k, v in event.traits.items()):
            return  # repeats the traits in force (apps send `group` on every session), or a repeat
        i = bisect_left(state.calls, pos, key=lambda c: (c[0], c[1]))
        state.calls.insert(i, [event.ms, event.messageId, event.traits])
        while len(state.calls) > MAX_CALLS:
            old = state.calls.pop(0)[2]
            if i == 0:  # older than every kept call (or a repeat of a merged one): later merged calls win
                state.traits.update({k: v for k, v in old.items() if k not in state.traits})
            else:
                state.traits.update(old)
        if state.sales and any(h.at >= event.ms for h in state.sales.handoffs):
            obs.diverged.append(LATE_TRAITS)
        # qualifications suppressed for fit at or after this call: fit again now? (the sorted stream
        # would have handed them off)
        if self.fit is not None and state.unfit:
            for ms, msg in [u for u in state.unfit if (u[0], u[1]) >= (event.ms, event.messageId)]:
                if self.fit(self.traits_at(state, (ms, msg))):
                    state.unfit.remove([ms, msg])
                    obs.refit.append((ms, msg))

    def traits_at(self, state: AccountState, pos: Pos) -> dict[str, Any]:
        """The account's traits as of a position: every group call up to it, the later winning per trait."""
        calls = state.calls
        end = bisect_right(calls, pos, key=lambda c: (c[0], c[1]))
        if end == 0:
            return state.traits
        merged = dict(state.traits)
        for c in calls[:end]:
            merged.update(c[2])
        return merged

    def _expire(self, state: AccountState) -> None:
        """Forget what no event inside the lateness bound can need any more."""
        cut = state.newest - self.bound
        if state.waiting:  # a waiting position is scored later: keep what it needs
            cut = min(cut, state.waiting[0][0])
        pending = [e[0] for e in state.expect.values() if e[1]]
        if pending:  # a group call's held events still to come count from `hold` before it
            cut = min(cut, min(pending) - self.rules.hold)
        for mid in list(state.hits):
            d = self.by_id.get(mid)
            if d is None:  # a milestone the rules no longer have
                for part in (state.hits, state.reach, state.anchor, state.defs):
                    part.pop(mid, None)
                continue
            reach = state.reach.get(mid, [])
            k = bisect_left(reach, cut, key=lambda r: r[0])
            if k > 0:  # freeze the latest reach before the cut, with its evidence
                at, msg = reach[k - 1]
                state.anchor[mid] = Reach(at=at, message_id=msg, evidence=self._evidence_at(state, mid, (at, msg)))
            if reach:
                del reach[:k]
                if not reach:
                    del state.reach[mid]
            d.keep(state.hits[mid], cut)
            if not state.hits[mid]:
                del state.hits[mid]
        state.unfit = [u for u in state.unfit if u[0] >= cut]
        # a call's entry waits for its MARKs however far the account's own events run ahead (behind a
        # backlog they come late in event time); MARKs whose call never came are forgotten
        state.expect = {c: e for c, e in state.expect.items() if e[1] or e[0] >= cut}
        while state.calls and state.calls[0][0] < cut:
            state.traits.update(state.calls.pop(0)[2])
        state.pruned_at = state.newest

    # -- where a milestone holds ------------------------------------------------------------------
    def _latest(self, state: AccountState, mid: str, pos: Pos, before: bool = False,
                skip: set | None = None) -> Pos | None:
        """The latest position at or before `pos` (strictly before, with `before`) where `mid` holds."""
        reach = state.reach.get(mid, ())
        k = (bisect_left if before else bisect_right)(reach, pos, key=tuple) - 1
        while k >= 0:
            p = tuple(reach[k])
            if skip is None or (p, mid) not in skip:
                return p
            k -= 1
        a = state.anchor.get(mid)
        return (a.at, a.message_id) if a is not None else None

    def _evidence_at(self, state: AccountState, mid: str, pos: Pos) -> list[Evidence]:
        a = state.anchor.get(mid)
        if a is not None and (a.at, a.message_id) == pos:
            return a.evidence
        rows = state.hits[mid]
        i = bisect_left(rows, pos, key=position)
        return self.by_id[mid].holds(rows, i) or []

    def _score(self, state: AccountState, pos: Pos, skip: set | None = None) -> tuple[int, list[str]]:
        lo = pos[0] - self.window
        counted = [d.id for d in self.detectors
                   if (r := self._latest(state, d.id, pos, skip=skip)) is not None and r[0] >= lo
                   and (d.fades is None or self._fresh(state, d, pos, skip))]
        return sum(self.by_id[m].rule.points for m in counted), counted

    @staticmethod
    def _fresh(state: AccountState, d: Detector, pos: Pos, skip: set | None) -> bool:
        """Has the account had an event matching `d` within its `fades` at or before `pos`?"""
        rows = state.hits.get(d.id, ())
        k = bisect_right(rows, pos, key=position) - 1
        while k >= 0 and skip is not None and ((rows[k][0], rows[k][1]), d.id) in skip:
            k -= 1
        return k >= 0 and pos[0] - rows[k][0] <= d.fades

    def _may_signal(self, state: AccountState, pos: Pos, mid: str) -> bool:
        """Can a new reach still get its pql.milestone? Not once the milestone held within the qualify
        window before it: reaches only come, never go, so that stays true."""
        prev = self._latest(state, mid, pos, before=True)
        return prev is None or pos[0] - prev[0] > self.window

    def _signal(self, state: AccountState, account_id: str, pos: Pos, mid: str, obs: Observation) -> None:
        """pql.milestone at a new reach, unless the milestone already held within the qualify window."""
        if self._may_signal(state, pos, mid):
            obs.milestones.append(self._milestone_event(account_id, self.by_id[mid], pos, state))

    def _qualify(self, state: AccountState, account_id: str, new: list[tuple[Pos, str]], obs: Observation) -> None:
        """Positions that qualify now and did not before: new reaches, the reaches the new ones bring
        inside their qualify window, and those a new row of a `fades` milestone keeps fresh."""
        skip = set(new) | set(obs.fresh)
        spans = [(new[0][0], (new[-1][0][0] + self.window, "\U0010ffff"))] if new else []
        spans += [(pos, (pos[0] + self.by_id[mid].fades, "\U0010ffff")) for pos, mid in obs.fresh]
        candidates = set()
        for reach in state.reach.values():
            for first, end in spans:
                lo = bisect_left(reach, first, key=tuple)
                hi = bisect_right(reach, end, key=tuple)
                candidates.update(tuple(r) for r in reach[lo:hi])
        for pos in sorted(candidates):
            score, counted = self._score(state, pos)
            if score < self.rules.qualify.score:
                continue
            held_before = any(_has(state.reach.get(mid, ()), pos) and (pos, mid) not in skip for mid in counted)
            if held_before and self._score(state, pos, skip)[0] >= self.rules.qualify.score:
                continue  # qualified before this event: decided then
            obs.qualified.append(Pending(account_id, pos[0], pos[1], score, counted))

    def _late_evidence(self, state: AccountState, ms: int, obs: Observation) -> None:
        """A late event inside the qualify window before a published handoff may change its evidence."""
        if state.sales and any(ms < h.at <= ms + self.window for h in state.sales.handoffs):
            obs.diverged.append(LATE_EVIDENCE)

    # -- step 2: decision ----------------------------------------------------------------------
    def decide(self, state: AccountState, p: Pending, mql: MqlRecord | None, now: int | None = None
               ) -> tuple[AccountState, CloudEvent | None, list[CloudEvent]]:
        """A handoff or a suppression, and the stage events (detectors/sales.py) that go with it.

        None when the position would start a handoff episode whose handoff, at a later position,
        is already published (EARLIER_QUALIFICATION): that handoff stands and its cooldown now
        counts from this position. None too for a re-check after a late group call (`refit`) that
        does not end in a handoff: the suppression published before stands. `now` (the caller's
        clock, a value like the MQL state) only decides whether a handoff is a backfill.
        """
        rules = self.rules
        ctx = self._context(state, p, mql)
        fit = ctx["fit"]
        reason = None
        last, later = _around(state, p.ms)
        ours = last is not None and last.status in ("accepted", "converted") and not _recycled(mql, last.status_at)
        in_cooldown = last is not None and p.ms - last.start < rules.cooldown
        if last is not None and last.muted is not None and (in_cooldown or ours):
            # one pql.suppressed per handoff: the first qualification after it that is not handed off
            if not p.refit:
                if (p.ms, p.message_id) < tuple(last.muted):  # a late event: the sorted stream published this one
                    p.diverged = EARLIER_QUALIFICATION
                else:
                    p.mutes = 1
            return state, None, []
        if fit is not None and not fit.passed:
            reason = "not_fit"
        elif mql is not None and mql.stage in IN_SALES:
            reason = "already_in_sales"
        elif ours:
            reason = "already_in_sales"  # sales accepted our last handoff, and the CRM has not recycled it
        elif in_cooldown:
            reason = "cooldown"
        if reason is not None and p.refit:
            return state, None, []  # its suppression is already published
        if reason == "not_fit" and [p.ms, p.message_id] not in state.unfit:
            insort(state.unfit, [p.ms, p.message_id])
        if reason is not None:
            if last is not None and (in_cooldown or ours):
                last.muted = [p.ms, p.message_id]
                p.mutes = self._unqueue(state, last)
            data = SuppressedData(
                **ctx, reason=reason,
                last_handoff_at=iso(last.at) if last is not None else None,
                last_handoff_id=last.id if last is not None else None,
            )
            stages = [] if ours or in_cooldown else sales.qualified_only(state, p.ms, reason)
            return state, self._event(SUPPRESSED, p, data), stages
        if later is not None:
            later.since = min(later.start, p.ms)
            p.diverged = EARLIER_QUALIFICATION
            return state, None, []
        supersedes = mql is not None and mql.stage in OPEN_MQL
        data = HandoffData(
            **ctx,
            precedence="pql_supersedes_mql" if supersedes else "pql_only",
            owner=mql.owner if mql else None,
            sla_due_at=iso(p.ms + rules.sla.pql),
            backfill=now is not None and self.alert_max_age is not None and now - p.ms > self.alert_max_age,
        )
        out = self._event(HANDOFF, p, data)
        return state, out, sales.handed_off(state, out.id, "pql", p.ms, p.ms + rules.sla.pql)

    def _muted(self, state: AccountState, pos: Pos) -> bool:
        """`decide` would mute a qualification at `pos` whatever arrives before it is decided."""
        last, _ = _around(state, pos[0])
        return last is not None and _safely_muted(last, pos, self.rules.cooldown, self.bound)

    def _unqueue(self, state: AccountState, h: Handoff) -> int:
        """Drop the waiting qualifications `h`, just muted, mutes whatever comes: how many."""
        keep = [w for w in state.waiting if len(w) == 3 or not _safely_muted(h, (w[0], w[1]), self.rules.cooldown,
                                                                               self.bound)]
        n, state.waiting[:] = len(state.waiting) - len(keep), keep
        return n

    def _context(self, state: AccountState, p: Pending, mql: MqlRecord | None) -> dict[str, Any]:
        """What a handoff and a suppression both carry: score, evidence, fit, MQL context."""
        pos = (p.ms, p.message_id)
        traits = self.traits_at(state, pos)
        fit = None
        if self.fit is not None:
            seen = {path: v for path, get in self.fit_traits if (v := get(traits)) is not MISSING}
            fit = FitResult(passed=self.fit(traits), traits=seen)
        return dict(
            account_id=p.account_id,
            account_name=_text(traits.get("name")),
            qualified_at=iso(p.ms),
            score=p.score,
            threshold=self.rules.qualify.score,
            milestones=p.milestones,
            evidence={m: self._evidence_at(state, m, self._latest(state, m, pos)) for m in p.milestones},
            fit=fit,
            mql=MqlContext(stage=mql.stage, owner=mql.owner) if mql else None,
            rules_version=self.rules.version,
        )

    def _event(self, kind: str, p: Pending, data: Any) -> CloudEvent:
        return CloudEvent(
            id=event_id(kind, p.account_id, self.rules.version, p.message_id),
            type=kind, time=iso(p.ms), subject=p.account_id, data=data,
        )

    def _milestone_event(self, account_id: str, d: Detector, pos: Pos, state: AccountState) -> CloudEvent:
        ms, msg = pos
        data = MilestoneData(
            account_id=account_id, milestone=d.id, description=d.description, points=d.rule.points,
            reached_at=iso(ms), evidence=self._evidence_at(state, d.id, pos), rules_version=self.rules.version,
        )
        return CloudEvent(
            id=event_id(MILESTONE, account_id, self.rules.version, msg, d.id),
            type=MILESTONE, time=iso(ms), subject=account_id, data=data,
        )

    # -- both steps, for callers that have the MQL state at hand --------------------------------
    def step(
        self, state: AccountState | None, events: list, account_id: str,
        mql_of: Callable[[str], MqlRecord | None], cut: int | None = None, marks: list = (), now: int | None = None,
    ) -> tuple[AccountState, Observation, list[CloudEvent]]:
        """observe_all + decide: each decision, then its stage events, in position order."""
        state, obs = self.observe_all(state, events, account_id, cut, marks)
        return state, obs, self.decide_all(state, obs.qualified, mql_of, obs, now)

    def decide_all(self, state: AccountState, qualified: list[Pending], mql_of: Callable[[str], MqlRecord | None],
                   obs: Observation, now: int | None = None) -> list[CloudEvent]:
        out: list[CloudEvent] = []
        if qualified:
            mql = mql_of(qualified[0].account_id)
            for p in qualified:
                state, decision, stages = self.decide(state, p, mql, now)
                obs.muted += p.mutes
                if decision is None:
                    obs.diverged += [p.diverged] if p.diverged else []
                    continue
                out += [decision, *stages]
        return out


def _has(reach: list, pos: Pos) -> bool:
    k = bisect_left(reach, pos, key=tuple)
    return k < len(reach) and tuple(reach[k]) == pos


def _around(state: AccountState, ms: int) -> tuple[Handoff | None, Handoff | None]:
    """The latest handoff at or before `ms`, and the earliest after it."""
    last = later = None
    for h in state.sales.handoffs if state.sales else ():
        if h.at <= ms:
            last = h
        elif later is None:
            later = h
    return last, later


def _safely_muted(h: Handoff, pos: Pos, cooldown: int, bound: int) -> bool:
    """Is a qualification at `pos` muted by `h` (its latest handoff) whatever comes later? Its
    episode may start earlier (`since`) but never more than `bound` before `at`."""
    return h.muted is not None and tuple(h.muted) <= pos and pos[0] < h.at + cooldown - bound


def _recycled(mql: MqlRecord | None, since: int | None) -> bool:
    """Did the CRM recycle the account after sales took it (then it may be handed off again)?"""
    if mql is None or mql.stage != "Recycled" or not mql.timestamp or since is None:
        return False
    try:
        return parse_ms(mql.timestamp) > since
    except ValueError:
        return False


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None
