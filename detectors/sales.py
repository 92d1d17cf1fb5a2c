"""The sales side of a handoff, pure: stage transitions, responses and SLA breaches.

No wall clock here either: a breach is decided against the `now` the caller passes (the live worker's
tick, in partition order), and its event is stamped with the due time, so it is the same bytes
whenever it is detected. Pending SLA clocks are a plain dict ``{handoff_id: [due_ms, account_id]}``
(the live worker keeps one per partition in a table).
"""
from __future__ import annotations

from detectors.ids import event_id
from detectors.timefmt import iso
from schemas.cloudevents import SLA_BREACHED, STAGE, CloudEvent, StageData
from schemas.sales import SalesResponse
from schemas.state import AccountState, Handoff, Sales

MAX_HANDOFFS = 10  # handoffs remembered per account (responses to older ones are reported unknown)
Clocks = dict[str, list]


def _sales(state: AccountState) -> Sales:
    if state.sales is None:
        state.sales = Sales()
    return state.sales


def _stage(state: AccountState, stage: str, ms: int, h: Handoff | None, kind: str = STAGE,
           eid: str | None = None, **extra) -> CloudEvent:
    s = _sales(state)
    if ms >= s.stages.get(stage, ms):
        s.stages[stage] = ms
    if s.stage is None or ms >= max(s.stages.values()):
        s.stage = stage
    data = StageData(
        account_id=state.account_id, stage=stage, at=iso(ms),
        lane=h.lane if h else "pql", handoff_id=h.id if h else None,
        handed_off_at=iso(h.at) if h else None, sla_due_at=iso(h.due) if h else None,
        seconds_since_handoff=(ms - h.at) / 1000 if h else None, **extra,
    )
    eid = eid or event_id(kind, state.account_id, h.id if h else "", stage, str(ms))
    return CloudEvent(id=eid, type=kind, time=iso(ms), subject=state.account_id, data=data)


def handed_off(state: AccountState, handoff_id: str, lane: str, ms: int, due: int) -> list[CloudEvent]:
    """A new handoff: the qualified and handed_off transitions; the handoff's SLA clock starts."""
    h = Handoff(id=handoff_id, lane=lane, at=ms, due=due)
    s = _sales(state)
    s.handoffs = [*s.handoffs, h][-MAX_HANDOFFS:]
    qualified = [] if s.stage == "qualified" else [_stage(state, "qualified", ms, h)]
    return [*qualified, _stage(state, "handed_off", ms, h)]


def qualified_only(state: AccountState, ms: int, reason: str) -> list[CloudEvent]:
    """A qualification that is not handed off (not fit, already in sales): one qualified transition
    per episode, not one per event while it lasts."""
    if state.sales is not None and state.sales.stage == "qualified":
        return []
    return [_stage(state, "qualified", ms, None, reason=reason)]


def find(state: AccountState, handoff_id: str) -> Handoff | None:
    return next((h for h in state.sales.handoffs if h.id == handoff_id), None) if state.sales else None


def respond(state: AccountState, r: SalesResponse) -> tuple[list[CloudEvent], str]:
    """Record a response. Outcome: recorded, repeat (same status again) or unknown_handoff.

    A first answer timed at or after the handoff's SLA due time breaches it first (the breach event,
    then the answer marked late), whether or not a tick got there before the answer arrived: the
    outcome follows the answer's timestamp, not the order the worker read them in."""
    h = find(state, r.handoff_id)
    if h is None:
        return [], "unknown_handoff"
    if h.status == r.status:
        return [], "repeat"
    breached = breach(state, h.id, r.ms)
    h.status, h.status_at = r.status, r.ms
    ev = _stage(state, r.status, r.ms, h, reason=r.reason, note=r.note, by=r.by, late=h.breached)
    return [*breached, ev], "recorded"


def breach(state: AccountState, handoff_id: str, now: int) -> list[CloudEvent]:
    """The SLA of an unanswered handoff has passed: one pql.sla_breached, stamped with the due time."""
    h = find(state, handoff_id)
    if h is None or h.status != "open" or h.breached or now < h.due:
        return []
    h.breached = True
    return [_stage(state, "sla_breached", h.due, h, kind=SLA_BREACHED, eid=event_id(SLA_BREACHED, h.id))]


def last(state: AccountState) -> Handoff | None:
    """The account's latest handoff (cooldown; and if sales accepted it, the account is theirs)."""
    return state.sales.handoffs[-1] if state.sales and state.sales.handoffs else None


def due(clocks: Clocks, now: int) -> list[tuple[str, str]]:
    """(handoff_id, account_id) of the clocks that have run out by `now`, earliest first."""
    ready = [(at, hid, acct) for hid, (at, acct) in clocks.items() if at <= now]
    return [(hid, acct) for _, hid, acct in sorted(ready)]
