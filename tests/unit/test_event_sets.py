"""Event sets and seat growth (issue 27): `event` takes a name, a list of names or "*"; `distinct:
userId` counts people (the call's userId, else its anonymousId)."""
import pytest

from helpers import at, rules, run, track
from schemas.rules import RulesError, load_rules


def page(name, ts, account="acme", user="u1"):
    doc = {"type": "page", "timestamp": ts, "userId": user, "messageId": f"p-{user}-{ts}", "properties": {},
           "context": {"groupId": account}}
    if name is not None:
        doc["name"] = name
    return doc


def milestones(outs):
    return [o["data"]["milestone"] for o in outs if o["type"] == "pql.milestone"]


def test_any_of_a_list_of_events_counts_and_where_still_applies():
    r = rules({"team": {"event": ["Invite Sent", "Member Added"], "count": 2, "within": "7d", "points": 60,
                        "where": {"properties.role": {"not_in": ["guest"]}}}})
    outs, _, _ = run(r, [track("Invite Sent", at(hours=1), role="admin"), track("Member Added", at(hours=2), role="guest"),
                         track("Feature Used", at(hours=3)), track("Member Added", at(hours=4), role="member")],
                     milestones=True)
    (h,) = [o for o in outs if o["type"] == "pql.handoff"]
    assert [e["event"] for e in h["data"]["evidence"]["team"]] == ["Invite Sent", "Member Added"]


def test_star_is_every_track_call_or_with_a_type_every_page_call():
    r = rules({"busy": {"event": "*", "count": 3, "within": "1d", "points": 60}})
    outs, _, _ = run(r, [track("A", at(hours=1)), page("Home", at(hours=2)), track("B", at(hours=3)),
                         track("C", at(hours=4))], milestones=True)
    assert milestones(outs) == ["busy"]
    (h,) = [o for o in outs if o["type"] == "pql.handoff"]
    assert [e["event"] for e in h["data"]["evidence"]["busy"]] == ["A", "B", "C"]  # the page call is not a track
    r = rules({"browsing": {"type": "page", "event": "*", "count": 2, "within": "1d", "points": 60}})
    outs, _, _ = run(r, [page("Home", at(hours=1)), track("A", at(hours=2)), page(None, at(hours=3))])
    assert [o["type"] for o in outs] == ["pql.handoff"]


def test_seat_growth_counts_distinct_people_in_the_window():
    r = rules({"seats": {"event": "*", "distinct": "userId", "count": 3, "within": "14d", "points": 60}})
    docs = [track("A", at(days=0), user="u1"), track("B", at(days=1), user="u1"), track("A", at(days=2), user="u2"),
            track("A", at(days=20), user="u3")]  # u1 and u2 are out of the window by then
    outs, _, _ = run(r, docs)
    assert not outs
    anon = track("A", at(days=21), user="x")
    del anon["userId"]
    anon["anonymousId"] = "visitor-7"  # a person without a userId counts by their anonymousId
    outs, _, _ = run(r, docs + [track("A", at(days=20, hours=1), user="u4"), anon])
    (h,) = [o for o in outs if o["type"] == "pql.handoff"]
    assert len(h["data"]["evidence"]["seats"]) == 3


def test_the_example_rules_have_a_seat_growth_milestone():
    m = load_rules("examples/rules.yaml").milestones["seat_growth"]
    assert m.distinct == "userId" and m.count >= 3 and m.within


@pytest.mark.parametrize("event, says", [([], "at least one name"), (["*", "A"], "stands alone"),
                                         (["A", "A"], "listed twice")])
def test_a_bad_event_set_names_the_field(tmp_path, event, says):
    import yaml

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"version": "x", "milestones": {"m": {"event": event, "points": 1}},
                                 "qualify": {"score": 1, "window": "1d"}}))
    with pytest.raises(RulesError, match=f"milestones.m.*{says}"):
        load_rules(f)
