"""The detection engine: (account state, event) -> (account state, decisions). Pure.

No I/O, no wall clock: time is the event's own ``timestamp``; the MQL record comes in as a value.
It works in two steps so the live worker reads Redis only when an account qualifies:

    state, obs = engine.observe(state, event, account_id)    # milestones, maybe a qualification
    if obs.qualified:
        state, decision, stages = engine.decide(state, obs.qualified, mql_record)

Responses and SLA breaches (the sales side) are in detectors/sales.py.

The engine updates the state it is given in place and returns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from detectors import sales
from detectors.conditions import MISSING, compile_conditions, getter
from detectors.ids import event_id
from detectors.milestones import Detector
from detectors.timefmt import iso, parse_ms
from schemas.cloudevents import (
    HANDOFF, MILESTONE, SUPPRESSED, CloudEvent, FitResult, HandoffData, MilestoneData, MqlContext, SuppressedData,
)
from schemas.events import Group
from schemas.mql import IN_SALES, OPEN_MQL, MqlRecord
from schemas.rules import Rules
from schemas.state import AccountState, Reach

@dataclass(slots=True)
class Pending:
    """An account that has just qualified; `decide` turns it into a handoff or a suppression."""

    account_id: str
    ms: int
    message_id: str
    score: int
    milestones: list[str]


@dataclass(slots=True)
class Observation:
    duplicate: bool = False
    milestones: list[CloudEvent] = field(default_factory=list)
    qualified: Pending | None = None


class Engine:
    def __init__(self, rules: Rules):
        self.rules = rules
        self.detectors = [Detector(mid, m) for mid, m in rules.milestones.items()]
        self.by_id = {d.id: d for d in self.detectors}
        self.listening: dict[tuple[str, str], list[Detector]] = {}
        for d in self.detectors:
            for name in d.names:
                self.listening.setdefault((d.type, name), []).append(d)
        self.horizon = rules.horizon
        fit = rules.fit.traits if rules.fit else None
        self.fit = compile_conditions(fit) if fit else None
        self.fit_traits = [(p, getter(p)) for p in fit] if fit else []

    # -- step 1: state -------------------------------------------------------------------------
    def relevant(self, event: Any) -> bool:
        """Can this event change any account's state? (Others need no state at all.)"""
        if isinstance(event, Group):
            return True
        name = event.name
        return name is not None and (event.type, name) in self.listening

    def observe(self, state: AccountState | None, event: Any, account_id: str) -> tuple[AccountState, Observation]:
        msg, ms = event.messageId, event.ms
        if state is None:
            state = AccountState(account_id=account_id, newest=ms, pruned_at=ms)
        obs = Observation()
        if msg in state.seen:
            obs.duplicate = True
            return state, obs
        state.seen[msg] = ms
        if ms > state.newest:
            state.newest = ms
            if ms - state.pruned_at >= self.horizon // 8:
                self._expire(state)
        if isinstance(event, Group):
            self._traits(state, event, ms)
            return state, obs
        reached = False
        for d in self.listening.get((event.type, event.name), ()):
            if not d.where(event):
                continue
            rows = state.hits.setdefault(d.id, [])
            evidence = d.apply(rows, event, ms)
            if not rows:
                del state.hits[d.id]
            if evidence is None:
                continue
            reached = True
            before = state.reached.get(d.id)
            if before is None or ms >= before.at:
                state.reached[d.id] = Reach(at=ms, message_id=msg, evidence=evidence)
            if before is None or ms - before.at > self.rules.qualify.window:
                obs.milestones.append(self._milestone_event(account_id, d, ms, msg, state.reached[d.id]))
        if reached:
            obs.qualified = self._qualify(state, account_id, ms, msg)
        return state, obs

    def _traits(self, state: AccountState, event: Group, ms: int) -> None:
        if state.traits_at is None or ms >= state.traits_at:
            state.traits.update(event.traits)
            if state.traits_at != ms:
                state.traits_at = ms
        else:  # an older call only fills traits we do not have yet
            for k, v in event.traits.items():
                state.traits.setdefault(k, v)

    def _expire(self, state: AccountState) -> None:
        lo = state.newest - self.horizon
        state.seen = {m: t for m, t in state.seen.items() if t >= lo}
        for mid in list(state.hits):
            d = self.by_id.get(mid)
            rows = state.hits[mid]
            if d is not None:
                d.expire(rows, state.newest)
            if d is None or not rows:
                del state.hits[mid]
        state.pruned_at = state.newest

    def _qualify(self, state: AccountState, account_id: str, ms: int, msg: str) -> Pending | None:
        lo = ms - self.rules.qualify.window
        counted = [d.id for d in self.detectors if (r := state.reached.get(d.id)) and lo <= r.at <= ms]
        score = sum(self.by_id[m].rule.points for m in counted)
        if score < self.rules.qualify.score:
            return None
        return Pending(account_id, ms, msg, score, counted)

    # -- step 2: decision ----------------------------------------------------------------------
    def decide(self, state: AccountState, p: Pending, mql: MqlRecord | None
               ) -> tuple[AccountState, CloudEvent, list[CloudEvent]]:
        """A handoff or a suppression, and the stage events (detectors/sales.py) that go with it."""
        rules = self.rules
        fit = None
        if self.fit is not None:
            seen = {path: v for path, get in self.fit_traits if (v := get(state.traits)) is not MISSING}
            fit = FitResult(passed=self.fit(state.traits), traits=seen)
        ctx = dict(
            account_id=p.account_id,
            account_name=_text(state.traits.get("name")),
            qualified_at=iso(p.ms),
            score=p.score,
            threshold=rules.qualify.score,
            milestones=p.milestones,
            evidence={m: state.reached[m].evidence for m in p.milestones},
            fit=fit,
            mql=MqlContext(stage=mql.stage, owner=mql.owner) if mql else None,
            rules_version=rules.version,
        )
        reason = None
        last = sales.last(state)
        ours = last is not None and last.status in ("accepted", "converted") and not _recycled(mql, last.status_at)
        in_cooldown = last is not None and p.ms - last.at < rules.cooldown
        if fit is not None and not fit.passed:
            reason = "not_fit"
        elif mql is not None and mql.stage in IN_SALES:
            reason = "already_in_sales"
        elif ours:
            reason = "already_in_sales"  # sales accepted our last handoff, and the CRM has not recycled it
        elif in_cooldown:
            reason = "cooldown"
        if reason is not None:
            data = SuppressedData(
                **ctx, reason=reason,
                last_handoff_at=iso(last.at) if last is not None else None,
                last_handoff_id=last.id if last is not None else None,
            )
            stages = [] if ours or in_cooldown else sales.qualified_only(state, p.ms, reason)
            return state, self._event(SUPPRESSED, p, data), stages
        supersedes = mql is not None and mql.stage in OPEN_MQL
        data = HandoffData(
            **ctx,
            precedence="pql_supersedes_mql" if supersedes else "pql_only",
            owner=mql.owner if mql else None,
            sla_due_at=iso(p.ms + rules.sla.pql),
        )
        out = self._event(HANDOFF, p, data)
        return state, out, sales.handed_off(state, out.id, "pql", p.ms, p.ms + rules.sla.pql)

    def _event(self, kind: str, p: Pending, data: Any) -> CloudEvent:
        return CloudEvent(
            id=event_id(kind, p.account_id, self.rules.version, p.message_id),
            type=kind, time=iso(p.ms), subject=p.account_id, data=data,
        )

    def _milestone_event(self, account_id: str, d: Detector, ms: int, msg: str, reach: Reach) -> CloudEvent:
        data = MilestoneData(
            account_id=account_id, milestone=d.id, description=d.description, points=d.rule.points,
            reached_at=iso(ms), evidence=reach.evidence, rules_version=self.rules.version,
        )
        return CloudEvent(
            id=event_id(MILESTONE, account_id, self.rules.version, msg, d.id),
            type=MILESTONE, time=iso(ms), subject=account_id, data=data,
        )

    # -- both steps, for callers that have the MQL state at hand --------------------------------
    def step(
        self, state: AccountState | None, event: Any, account_id: str,
        mql_of: Callable[[str], MqlRecord | None],
    ) -> tuple[AccountState, Observation, list[CloudEvent]]:
        """observe + decide: the decision (if any) first, then its stage events."""
        state, obs = self.observe(state, event, account_id)
        if obs.qualified is None:
            return state, obs, []
        state, decision, stages = self.decide(state, obs.qualified, mql_of(account_id))
        return state, obs, [decision, *stages]


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
