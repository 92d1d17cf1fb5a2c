"""The sales side of the pure core (detectors/sales.py): stages, responses, SLA breaches."""
import pytest
from pydantic import ValidationError

from detectors import sales
from detectors.engine import Engine
from helpers import at, event, rules, track
from schemas.mql import MqlRecord
from schemas.sales import SalesResponse

CRM = {"event": "Integration Connected", "where": {"properties.integration": {"in": ["salesforce", "hubspot"]}},
       "points": 20}
MIN = 60_000


def engine(**extra) -> Engine:
    return Engine(rules({"crm": CRM}, score=20, sla={"pql": "10m"}, cooldown="30d", **extra))


def qualify(e: Engine, state=None, mql=None, mid=None, **when):
    ev = event(track("Integration Connected", at(**when), mid=mid, integration="hubspot"))
    state, obs = e.observe(state, ev, "acme")
    assert len(obs.qualified) == 1
    return e.decide(state, obs.qualified[0], mql)


def response(handoff_id: str, status: str, minutes: float, **kw) -> SalesResponse:
    ts = at(minutes=minutes)
    return SalesResponse(handoff_id=handoff_id, account_id="acme", status=status, timestamp=ts, **kw)


def test_handoff_starts_a_cycle_with_qualified_and_handed_off_stages():
    state, handoff, stages = qualify(engine())
    assert [s.type for s in stages] == ["pql.stage", "pql.stage"]
    assert [s.data.stage for s in stages] == ["qualified", "handed_off"]
    assert all(s.data.handoff_id == handoff.id for s in stages)
    h = sales.last(state)
    assert (h.id, h.status, h.due - h.at) == (handoff.id, "open", 10 * MIN)
    assert stages[1].data.sla_due_at == handoff.data.sla_due_at
    assert state.sales.stage == "handed_off" and set(state.sales.stages) == {"qualified", "handed_off"}


def test_accept_records_time_to_accept_and_a_repeat_is_ignored():
    state, handoff, _ = qualify(engine())
    out, outcome = sales.respond(state, response(handoff.id, "accepted", 4, by="rep-1"))
    assert outcome == "recorded" and out[0].data.stage == "accepted"
    assert out[0].data.seconds_since_handoff == 240.0 and out[0].data.by == "rep-1" and not out[0].data.late
    assert sales.respond(state, response(handoff.id, "accepted", 5)) == ([], "repeat")
    converted, _ = sales.respond(state, response(handoff.id, "converted", 60))
    assert converted[0].data.stage == "converted" and state.sales.stage == "converted"
    assert sales.breach(state, handoff.id, at_ms(handoff.data.sla_due_at)) == []  # answered: no breach


def at_ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_breach_once_at_the_due_time_and_a_late_acceptance_is_still_recorded():
    state, handoff, _ = qualify(engine())
    due = at_ms(handoff.data.sla_due_at)
    assert sales.breach(state, handoff.id, due - 1) == []
    first = sales.breach(state, handoff.id, due + 5000)
    assert [e.type for e in first] == ["pql.sla_breached"] and first[0].data.stage == "sla_breached"
    assert first[0].time == handoff.data.sla_due_at  # stamped with the due time: same bytes whenever found
    assert sales.breach(state, handoff.id, due + 9000) == []
    late, outcome = sales.respond(state, response(handoff.id, "accepted", 30))
    assert outcome == "recorded" and late[0].data.late is True


def test_breach_event_is_the_same_bytes_whenever_it_is_detected():
    s1, h1, _ = qualify(engine(), mid="m-1")
    s2, h2, _ = qualify(engine(), mid="m-1")
    due = at_ms(h1.data.sla_due_at)
    assert sales.breach(s1, h1.id, due)[0].to_json() == sales.breach(s2, h2.id, due + 3_600_000)[0].to_json()


def test_unknown_handoff_is_reported():
    state, _, _ = qualify(engine())
    assert sales.respond(state, response("nope", "accepted", 1)) == ([], "unknown_handoff")


def test_rejected_account_is_recycled_after_the_cooldown():
    e = engine()
    state, handoff, _ = qualify(e)
    sales.respond(state, response(handoff.id, "rejected", 3, reason="not_icp"))
    state, again, stages = qualify(e, state, days=10)
    assert again.type == "pql.suppressed" and again.data.reason == "cooldown" and stages == []
    state, again, stages = qualify(e, state, days=31)
    assert again.type == "pql.handoff" and [s.data.stage for s in stages] == ["qualified", "handed_off"]


def test_accepted_account_stays_with_sales_until_the_crm_recycles_it():
    e = engine()
    state, handoff, _ = qualify(e)
    sales.respond(state, response(handoff.id, "accepted", 3))
    state, again, stages = qualify(e, state, days=40)
    assert again.data.reason == "already_in_sales" and stages == []
    recycled = MqlRecord(account_id="acme", stage="Recycled", timestamp=at(days=35))
    state, again, _ = qualify(e, state, mql=recycled, days=41)
    assert again.type == "pql.handoff"


def test_suppressed_qualification_publishes_qualified_once_per_episode():
    e = Engine(rules({"crm": CRM}, score=20, fit={"traits": {"employees": {"gte": 10}}}))
    state, first, stages = qualify(e)
    assert first.data.reason == "not_fit" and [s.data.stage for s in stages] == ["qualified"]
    assert stages[0].data.reason == "not_fit" and stages[0].data.handoff_id is None
    state, _, stages = qualify(e, state, hours=1)
    assert stages == []


def test_due_clocks_in_due_order():
    clocks = {"b": [200, "acct-2"], "a": [100, "acct-1"], "c": [300, "acct-3"]}
    assert sales.due(clocks, 250) == [("a", "acct-1"), ("b", "acct-2")]
    assert sales.due(clocks, 99) == []


@pytest.mark.parametrize("doc, field", [
    ({"status": "rejected"}, "reason"),
    ({"status": "rejected", "reason": "too_expensive"}, "reason"),
    ({"status": "rejected", "reason": "other"}, "note"),
    ({"status": "maybe"}, "status"),
    ({"status": "accepted", "timestamp": "soon"}, "timestamp"),
    ({"status": "accepted", "handoff_id": ""}, "handoff_id"),
])
def test_bad_responses_name_the_field(doc, field):
    base = {"handoff_id": "h1", "account_id": "acme", "timestamp": at()}
    with pytest.raises(ValidationError) as err:
        SalesResponse.model_validate({**base, **doc})
    assert field in str(err.value)


def test_every_listed_reason_is_accepted():
    for reason in ("not_icp", "duplicate", "bad_data", "student_or_research", "competitor", "no_budget",
                   "bad_timing"):
        assert response("h", "rejected", 1, reason=reason).reason == reason


def test_an_answer_after_the_sla_breaches_it_first_whatever_came_first():
    """The chaos run: a worker recovering read a late answer before its tick checked the clock, so
    no breach was published where replay (and the answer's timestamp) says there was one."""
    state, handoff, _ = qualify(engine())
    events, outcome = sales.respond(state, response(handoff.id, "accepted", minutes=11))
    assert outcome == "recorded"
    assert [(e.type, e.data.stage, e.data.late) for e in events] == [
        ("pql.sla_breached", "sla_breached", False), ("pql.stage", "accepted", True)]
    assert sales.breach(state, handoff.id, 10**15) == []  # once only: the tick that comes later finds it done
    on_time, _, _ = qualify(engine())
    events, _ = sales.respond(on_time, response(sales.last(on_time).id, "accepted", minutes=9))
    assert [e.data.stage for e in events] == ["accepted"] and not events[0].data.late
