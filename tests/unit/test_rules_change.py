"""Rules changed on a running deployment (docs/operations.md "Changing rules"): a worker restarted
with new rules keeps its tables; each account's state follows the new rules from its next event
(detectors/engine.py `reconcile`). `pql replay --switch LINE:RULES` runs the same engine across the
same change, so what is asserted here is what the live worker does (tests/stack/test_rules_change_live.py)."""
import io
import json

from detectors.engine import Engine
from helpers import at, event, group, rules, track
from streams.tools.replay import Replay, replay

INVITES = {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "2d", "points": 40}
CRM = {"event": "Integration Connected", "points": 30}


def across(before, after, docs_before, docs_after, milestones=True):
    """Replay docs_before with `before`, then docs_after with `after` (a rules deploy between them).
    Returns (outputs after the switch, outputs before, the replay)."""
    out, err = io.StringIO(), io.StringIO()
    lines = [json.dumps(d).encode() for d in docs_before + docs_after]
    replay(lines, Engine(before), {}, out, err, milestones=milestones,
           switches={len(docs_before) + 1: Engine(after)})
    outs = [json.loads(x) for x in out.getvalue().splitlines()]
    cut = next((i for i, o in enumerate(outs) if o["data"].get("rules_version") == after.version), len(outs))
    return outs[cut:], outs[:cut]


def invite(h, n, account="acme"):
    return track("Invite Sent", at(hours=h), account=account, email=f"p{n}@x.example")


def handoffs(outs):
    return [o for o in outs if o["type"] == "pql.handoff"]


def test_points_raised_count_from_the_next_reach_and_outputs_say_which_rules_decided():
    old = rules({"invites": INVITES}, score=60)
    new = rules({"invites": {**INVITES, "points": 60}}, score=60).model_copy(update={"version": "v2"})
    after, before = across(old, new, [invite(1, 1), invite(2, 2), invite(3, 3)], [invite(4, 4)])
    assert not handoffs(before)  # 40 points < 60
    (h,) = handoffs(after)
    assert h["data"]["rules_version"] == "v2" and h["data"]["score"] == 60


def test_a_handoff_made_stays_made_and_its_cooldown_holds_across_a_change():
    old = rules({"invites": {**INVITES, "points": 60}}, score=60)
    new = rules({"invites": {**INVITES, "points": 60}, "crm": CRM}, score=30).model_copy(update={"version": "v2"})
    after, before = across(old, new, [invite(1, 1), invite(2, 2), invite(3, 3)],
                           [track("Integration Connected", at(days=2)), invite(50, 5)])
    assert len(handoffs(before)) == 1
    assert not handoffs(after)
    assert {o["data"]["reason"] for o in after if o["type"] == "pql.suppressed"} <= {"cooldown"}


def test_a_removed_milestone_stops_counting_and_leaves_the_state():
    old = rules({"invites": INVITES, "crm": CRM}, score=60)
    new = rules({"crm": CRM}, score=60).model_copy(update={"version": "v2"})
    docs_after = [track("Integration Connected", at(hours=5))]
    after, before = across(old, new, [invite(1, 1), invite(2, 2), invite(3, 3)], docs_after)
    assert not handoffs(after)  # 30 < 60 without the invites' 40
    kept = across(old, old.model_copy(update={"version": "v2"}), [invite(1, 1), invite(2, 2), invite(3, 3)],
                  docs_after)[0]
    assert len(handoffs(kept)) == 1  # (with them, it would hand off)
    r = Replay(Engine(old), {})
    for n, d in enumerate([invite(1, 1), invite(2, 2), invite(3, 3)], 1):
        r.feed(n, json.dumps(d).encode(), io.StringIO(), io.StringIO())
    r.switch(Engine(new))
    r.feed(4, json.dumps(docs_after[0]).encode(), io.StringIO(), io.StringIO())
    state = r.states["acme"]
    assert "invites" not in state.hits and "invites" not in state.reach and set(state.defs) == {"crm"}


def test_an_added_milestone_sees_events_from_the_deploy_on():
    old = rules({"invites": INVITES}, score=60)
    new = rules({"invites": INVITES, "crm": {**CRM, "points": 60}}, score=60).model_copy(update={"version": "v2"})
    crm = track("Integration Connected", at(hours=1))
    after, _ = across(old, new, [crm], [invite(2, 1)])
    assert not [o for o in after if o["type"] in ("pql.milestone", "pql.handoff")]  # the CRM event came before
    after, _ = across(old, new, [invite(2, 1)], [crm])
    assert len(handoffs(after)) == 1


def test_a_longer_window_finds_its_reaches_again_in_the_rows_kept():
    """within 2d -> 5d: three invites spread over 4 days hold under the new window; found again from
    the kept rows (silently: no pql.milestone for the past), they count at the next reach."""
    old = rules({"invites": INVITES, "crm": CRM}, score=60)
    new = rules({"invites": {**INVITES, "within": "5d"}, "crm": CRM}, score=60).model_copy(update={"version": "v2"})
    docs = [invite(0, 1), invite(40, 2), invite(90, 3)]
    after, before = across(old, new, docs, [track("Integration Connected", at(hours=95))])
    assert not [o for o in before if o["type"] == "pql.milestone" and o["data"]["milestone"] == "invites"]
    assert [o["data"]["milestone"] for o in after if o["type"] == "pql.milestone"] == ["crm"]
    (h,) = handoffs(after)
    assert set(h["data"]["milestones"]) == {"invites", "crm"}
    a = across(old, new, docs, [invite(91, 4)])[0]  # it held already (found again): no signal once found
    assert not [o for o in a if o["type"] == "pql.milestone"]


def test_a_changed_match_starts_the_milestone_over():
    old = rules({"invites": INVITES, "crm": CRM}, score=60)
    new = rules({"invites": {**INVITES, "where": {"properties.role": "admin"}}, "crm": CRM},
                score=60).model_copy(update={"version": "v2"})
    after, _ = across(old, new, [invite(1, 1), invite(2, 2), invite(3, 3)], [track("Integration Connected", at(hours=5))])
    assert not handoffs(after)  # the invites were kept under the old match: gone


def test_a_changed_fit_decides_what_comes_after_it():
    old = rules({"invites": {**INVITES, "points": 60}}, score=60, fit={"traits": {"employees": {"gte": 10}}})
    new = old.model_copy(update={"version": "v2", "fit": None})
    docs = [group("acme", at(hours=0), employees=5), invite(1, 1), invite(2, 2), invite(3, 3)]
    after, before = across(old, new, docs, [invite(4, 4)])
    assert [o["data"]["reason"] for o in before if o["type"] == "pql.suppressed"] == ["not_fit"]
    assert len(handoffs(after)) == 1


def test_a_removed_milestone_waiting_to_be_signalled_is_dropped_not_a_crash():
    """rules `settle`: reaches wait for their pql.milestone; one of a milestone the new rules lack."""
    old = rules({"invites": INVITES, "crm": CRM}, score=60, settle="1d")
    new = rules({"crm": CRM}, score=60, settle="1d").model_copy(update={"version": "v2"})
    after, before = across(old, new, [invite(1, 1), invite(2, 2), invite(3, 3)], [track("Integration Connected", at(days=3))])
    assert not [o for o in before + after if o["type"] == "pql.milestone" and o["data"]["milestone"] == "invites"]
    assert [o["data"]["milestone"] for o in after if o["type"] == "pql.milestone"] == ["crm"]


def test_a_state_from_before_signatures_follows_the_rules_it_meets():
    """A state written before `defs` existed: its milestones are taken as defined now; one the rules
    lack is dropped (and its waiting signal with it)."""
    from schemas.state import AccountState

    r = rules({"invites": INVITES, "crm": CRM}, score=60, settle="1d")
    state, _ = Engine(r).observe_all(None, [event(invite(n, n)) for n in (1, 2, 3)], "acme", cut=0)
    old = AccountState.model_validate({**state.model_dump(), "defs": {}})
    assert old.waiting and "invites" in old.hits
    Engine(r).reconcile(old)
    assert set(old.defs) == {"invites"} and old.hits == state.hits
    gone = AccountState.model_validate({**state.model_dump(), "defs": {}})
    Engine(rules({"crm": CRM}, score=60, settle="1d")).reconcile(gone)
    assert not gone.hits and not gone.reach and not [w for w in gone.waiting if len(w) == 3]
