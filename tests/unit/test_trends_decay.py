"""Trends (`growth`) and decay (`fades`), issue 27: event-time semantics like every milestone (the
permutation properties in test_event_time.py run both)."""
import pytest

from helpers import at, rules, run, track
from schemas.rules import RulesError, load_rules

CRM = {"event": "Integration Connected", "points": 40, "fades": "3d"}
INVITE = {"event": "Invite Sent", "points": 20}


def handoffs(outs):
    return [o for o in outs if o["type"] == "pql.handoff"]


@pytest.mark.parametrize("crm_day, qualifies", [(0, False), (2, True)])
def test_points_fade_after_a_quiet_spell(crm_day, qualifies):
    r = rules({"crm": CRM, "invite": INVITE}, score=60)
    outs, _, _ = run(r, [track("Integration Connected", at(days=crm_day)), track("Invite Sent", at(days=5))])
    assert bool(handoffs(outs)) == qualifies  # day 5: the CRM milestone counts only within 3 days of its event


def test_a_late_matching_event_keeps_the_points_fresh_as_in_time_order():
    r = rules({"crm": CRM, "invite": INVITE}, score=60)
    docs = [track("Integration Connected", at(days=0)), track("Invite Sent", at(days=5)),
            track("Integration Connected", at(days=4))]  # arrives last, belongs before the invite
    late, _, _ = run(r, docs)
    sorted_, _, _ = run(r, [docs[0], docs[2], docs[1]])
    assert [h["id"] for h in handoffs(late)] == [h["id"] for h in handoffs(sorted_)] and handoffs(sorted_)


def test_growth_is_the_later_window_against_the_earlier_one():
    r = rules({"trend": {"event": "Feature Used", "growth": {"over": "10d", "at_least": 2, "min": 6},
                         "points": 60}})
    before = [track("Feature Used", at(hours=h)) for h in (12, 24, 36)]       # 3 in the earlier window
    after = [track("Feature Used", at(days=12, hours=h)) for h in range(6)]   # 6 in the later one: 6 >= 2 x 3
    outs, _, _ = run(r, before + after, milestones=True)
    (h,) = handoffs(outs)
    assert len(h["data"]["evidence"]["trend"]) == 6
    assert h["data"]["evidence"]["trend"][-1]["timestamp"].startswith("2026-11-13T05")
    outs, _, _ = run(r, before + [track("Feature Used", at(hours=40))] + after)
    assert not handoffs(outs)  # 6 < 2 x 4
    outs, _, _ = run(r, after[:5])
    assert not handoffs(outs)  # under the minimum: 1 -> 5 is not growth enough to count


def test_growth_of_distinct_people():
    r = rules({"seats_up": {"event": "*", "distinct": "userId", "growth": {"over": "10d", "at_least": 2, "min": 4},
                            "points": 60}})
    docs = [track("A", at(days=1), user="u1"), track("A", at(days=2), user="u2"),
            *[track("A", at(days=12 + k), user=f"u{k}") for k in range(1, 5)]]
    outs, _, _ = run(r, docs)
    assert len(handoffs(outs)) == 1


def test_a_trend_window_shorter_than_lateness_and_hold_is_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("version: x\n"
                 "milestones:\n  t:\n    event: A\n    growth: {over: 7d, at_least: 1.5, min: 10}\n    points: 10\n"
                 "qualify: {score: 10, window: 30d}\n")
    with pytest.raises(RulesError, match=r"milestones.t.growth.over: must be at least lateness \+ 2 x hold \(216 h"):
        load_rules(f)


def test_growth_takes_no_count():
    with pytest.raises(ValueError, match="growth compares two windows"):
        rules({"t": {"event": "A", "count": 3, "growth": {"over": "10d", "at_least": 2}, "points": 1}})
