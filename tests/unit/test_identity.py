"""Late attribution (issue 11): events of a user whose account is not known yet are held, not
dropped, and attributed when a group call (or an identify joining an anonymous id) makes it known."""
from __future__ import annotations

from helpers import at, group, kinds, rules, run, track

CRM = {"event": "Integration Connected", "points": 20}
INVITES = {"event": "Invite Sent", "distinct": "properties.invitee_email", "count": 3, "within": "7d", "points": 60}


def _invites(*hours, user="u1"):
    return [track("Invite Sent", at(hours=h), account=None, user=user, invitee_email=f"p{h}@x.io") for h in hours]


def test_events_before_the_group_call_count_for_its_account():
    # sign up, invite three teammates, then the app sends `group`: the account qualifies
    docs = _invites(0, 1, 2) + [group("acme", at(hours=3))]
    out, s, _ = run(rules({"inv": INVITES}), docs)
    assert kinds(out) == ["pql.handoff"] and out[0]["subject"] == "acme"
    assert out[0]["data"]["qualified_at"] == at(hours=2).replace("Z", ".000Z")
    assert s.held == 0 and s.unattributed == 0


def test_the_group_call_may_arrive_first_or_last():
    docs = _invites(0, 1, 2) + [group("acme", at(hours=3))]
    first, _, _ = run(rules({"inv": INVITES}), docs)
    for order in ([3, 0, 1, 2], [0, 3, 1, 2], [2, 0, 3, 1]):
        out, _, _ = run(rules({"inv": INVITES}), [docs[i] for i in order])
        assert out == first, order


def test_a_group_call_later_than_the_hold_does_not_attribute():
    r = rules({"crm": CRM}, score=20, hold="1h")
    docs = [track("Integration Connected", at(), account=None), group("acme", at(hours=1, milliseconds=1))]
    out, s, _ = run(r, docs)
    assert out == [] and s.held == 1
    out, _, _ = run(r, [docs[0], group("acme", at(hours=1))])  # exactly the hold: inside
    assert kinds(out) == ["pql.handoff"]


def test_events_after_a_group_call_go_to_its_account_and_before_a_later_call_stay():
    r = rules({"crm": CRM}, score=20)
    docs = [group("old", at(days=0)), group("new", at(days=2)),
            track("Integration Connected", at(days=1), account=None, mid="x1"),
            track("Integration Connected", at(days=3), account=None, mid="x2")]
    out, _, _ = run(r, docs)
    assert sorted((o["subject"], o["data"]["evidence"]["crm"][0]["messageId"]) for o in out) == [
        ("new", "x2"), ("old", "x1")]


def test_identify_joins_anonymous_events_to_the_user():
    r = rules({"inv": INVITES})
    anon = [dict(d, anonymousId="anon-1") for d in _invites(0, 1, 2)]
    for d in anon:
        del d["userId"]
    identify = {"type": "identify", "userId": "u9", "anonymousId": "anon-1", "messageId": "i1", "timestamp": at(hours=4)}
    docs = anon + [identify, group("acme", at(hours=5), user="u9")]
    want, _, _ = run(r, docs)
    assert kinds(want) == ["pql.handoff"] and want[0]["subject"] == "acme"
    for order in ([4, 3, 0, 1, 2], [3, 4, 2, 1, 0], [0, 4, 1, 3, 2]):
        out, s, _ = run(r, [docs[i] for i in order])
        assert out == want and s.held == 0, order


def test_alias_joins_previous_id():
    r = rules({"crm": CRM}, score=20)
    doc = track("Integration Connected", at(), account=None)
    del doc["userId"]
    doc["anonymousId"] = "old-id"
    alias = {"type": "alias", "userId": "u7", "previousId": "old-id", "messageId": "al1", "timestamp": at(minutes=5)}
    out, _, _ = run(r, [doc, group("acme", at(minutes=10), user="u7"), alias])
    assert kinds(out) == ["pql.handoff"] and out[0]["subject"] == "acme"


def test_held_events_expire_and_are_counted_unattributed():
    r = rules({"crm": CRM}, score=20, lateness="2d", hold="1d")
    docs = [track("Integration Connected", at(), account=None, user="u5", mid="early"),
            track("Feature Used", at(days=4), account=None, user="u5")]
    # Feature Used is no rule's event: it never reaches the user's state; a relevant one does
    docs.append(track("Integration Connected", at(days=4), account=None, user="u5", mid="later"))
    out, s, _ = run(r, docs)
    assert out == [] and s.unattributed == 1 and s.held == 1  # 'early' expired, 'later' still waits


def test_an_account_decides_nothing_until_its_group_calls_users_released_what_they_held():
    """Live, the group call reaches its account before its user's partition forwards the held events.
    The account waits for the MARK that ends that forward (in either order), then decides."""
    from detectors import identity
    from detectors.engine import Engine
    from schemas.events import parse_event
    import json

    engine = Engine(rules({"inv": INVITES}))
    users = identity.Users(engine.rules.hold, engine.rules.bound, raw=lambda e: e.model_dump_json(by_alias=True),
                           parse=parse_event)
    from schemas.state import UserState

    ev = lambda d: parse_event(json.dumps(d).encode())
    u = UserState(key="u:u1")
    for d in _invites(0, 1, 2):  # held on the user's partition
        assert users.run(u, identity.USER, ev(d)) == ([], 0)
    call = ev(group("acme", at(hours=3)))
    [(_, account, c), link] = identity.dispatch(call, engine.relevant)[0]
    assert link[0] == identity.LINK and link[2] == ("acme", call.ms, [call.messageId, "u"])
    for marks_first in (False, True):
        forward, _ = users.run(UserState(key="u:u1", held=list(u.held)), identity.LINK, link[2])
        held = [arg for kind, _, arg in forward if kind == identity.EVENT]
        marks = [arg for kind, _, arg in forward if kind == identity.MARK]
        assert len(held) == 3 and marks == [(call.messageId, "u", call.ms)]
        answered = {call.messageId: [call.ms, "", "u"]}  # (kept until the state passes it)
        if marks_first:
            state, obs = engine.observe_all(None, [], "acme", cut=call.ms, marks=marks)
            state, obs = engine.observe_all(state, [c, *held], "acme", cut=call.ms)
            assert [p.ms for p in obs.qualified] == [held[2].ms] and state.expect == answered
            continue
        state, obs = engine.observe_all(None, [c], "acme", cut=call.ms)
        assert obs.qualified == [] and state.expect == {call.messageId: [call.ms, "u", ""]}
        # the account's stream moves on; its waiting positions stay until the MARK
        state, obs = engine.observe_all(state, held, "acme", cut=call.ms + 10**9)
        assert obs.qualified == [] and state.waiting
        state, obs = engine.observe_all(state, [], "acme", cut=call.ms + 10**9, marks=marks)
        assert [p.ms for p in obs.qualified] == [held[2].ms] and not state.waiting
        assert state.expect == answered
        # the ingest tier sends the call's lines again (at-least-once), in either order, or the
        # account's line alone (its batch half written when the worker was killed): nothing waits
        state, _ = engine.observe_all(state, [c], "acme", cut=call.ms + 10**9)
        assert state.expect == answered
        state, _ = engine.observe_all(state, [], "acme", cut=call.ms + 10**9, marks=marks)
        state, _ = engine.observe_all(state, [], "acme", cut=call.ms + 10**9, marks=marks)
        state, _ = engine.observe_all(state, [c], "acme", cut=call.ms + 10**9)
        assert state.expect == answered


def test_a_call_repeated_without_its_link_does_not_hold_the_account_for_ever():
    """A worker killed half way through writing a batch: after its restart the ingest tier routes the
    batch again, so the account gets the group call's line twice and its user key the LINK line once
    (one MARK). The account decided nothing more (cluster chaos seed 3, session 12)."""
    from detectors import identity
    from detectors.engine import Engine
    from schemas.events import parse_event
    import json

    engine = Engine(rules({"inv": INVITES}))
    ev = lambda d: parse_event(json.dumps(d).encode())
    call = ev(group("acme", at(hours=3)))
    [(_, _, c), _] = identity.dispatch(call, engine.relevant)[0]
    mark = (call.messageId, "u", call.ms)
    state, _ = engine.observe_all(None, [c], "acme", cut=call.ms)
    state, _ = engine.observe_all(state, [], "acme", cut=call.ms, marks=[mark])
    state, _ = engine.observe_all(state, [c], "acme", cut=call.ms)  # the repeat, with no LINK behind it
    invites = [ev({**d, "context": {"groupId": "acme"}}) for d in _invites(4, 5, 6)]
    state, obs = engine.observe_all(state, invites, "acme", cut=invites[-1].ms)
    assert [p.ms for p in obs.qualified] == [invites[-1].ms]
