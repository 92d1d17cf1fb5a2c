"""Bursts and backlogs (issue 23): an account's history that arrives together and spans more than
the rules' lateness gives the outputs of the time-sorted stream, however it is cut into envelopes
and whenever the caller lets the waiting decisions go (the live barrier's `cut`).

The live worker applies an envelope of an account's events with `Engine.step(..., cut)`, where
`cut` trails the stream time while the barrier waits; the decisions held back are let go later by
`Engine.due`. Before this was fixed, an event weeks ahead in the same envelope expired the state a
held-back qualification was scored on, and the qualification was never decided.
"""
from __future__ import annotations

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.engine import Engine, Observation
from detectors.settle import Waiting
from helpers import T0, at, event, rules, run, track
from streams.tools.replay import replay

DAY = 86_400_000
RULES = rules(
    {
        "inv": {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "2d", "points": 40},
        "crm": {"event": "Integration Connected", "points": 20},
        "act": {"sequence": ["Source Connected", "Job Run"], "within": "1d", "points": 30},
    },
    score=60, window="5d", cooldown="10d", lateness="2d", hold="1d",
    fit={"traits": {"employees": {"gte": 10}}},
)
NAMES = ["Invite Sent", "Invite Sent", "Integration Connected", "Source Connected", "Job Run", "Feature Used"]
T0_MS = int(T0.timestamp() * 1000)


def _iso(ms: int) -> str:
    from detectors.timefmt import iso

    return iso(T0_MS + ms)


@st.composite
def backlogs(draw):
    """Time-ordered histories of two accounts over eight weeks (lateness is 2 days)."""
    n = draw(st.integers(20, 90))
    times = sorted(draw(st.lists(st.integers(0, 56 * 24 * 4), min_size=n, max_size=n)))
    docs = []
    for k, q in enumerate(times):
        account = draw(st.sampled_from(["a1", "a2"]))
        ms = q * DAY // 96
        if draw(st.integers(0, 15)) == 0:
            docs.append({"type": "group", "groupId": account, "userId": f"{account}-u", "messageId": f"m{k:03d}",
                         "timestamp": _iso(ms), "traits": {"employees": draw(st.sampled_from([5, 50]))}})
            continue
        docs.append({"type": "track", "event": draw(st.sampled_from(NAMES)), "userId": f"{account}-u",
                     "messageId": f"m{k:03d}", "timestamp": _iso(ms), "context": {"groupId": account},
                     "properties": {"email": f"p{draw(st.integers(0, 4))}@x.io"}})
    return docs


def _sorted_replay(docs: list[dict]) -> list[str]:
    out = io.StringIO()
    replay([json.dumps(d).encode() for d in docs], Engine(RULES), {}, out, io.StringIO(), stages=True)
    return out.getvalue().splitlines()


def _in_envelopes(docs: list[dict], cuts: list[int], lags: list[int | None]) -> list[str]:
    """The engine as the worker drives it: each envelope's events per account in one `step`, with a
    decision cut that lags the stream time (None: decide nothing yet), then what waits is let go."""
    engine, states, waiting, out, stream = Engine(RULES), {}, Waiting(), [], 0
    bounds = sorted({0, len(docs), *cuts})
    for lo, hi, lag in zip(bounds, bounds[1:], lags + [None] * len(bounds)):
        envelope = [event(d) for d in docs[lo:hi]]
        stream = max([stream] + [e.ms for e in envelope])
        cut = -1 if lag is None else stream - lag
        per_account: dict[str, list] = {}
        for e in envelope:
            per_account.setdefault(getattr(e, "groupId", None) or e.context["groupId"], []).append(e)
        for account, events in per_account.items():
            state, obs, outputs = engine.step(states.get(account), events, account, lambda a: None, cut)
            states[account] = state
            waiting.track(account, state)
            out += [o.to_json() for o in outputs]
        for _, account in waiting.ready(cut):
            state = states[account]
            obs = Observation()
            out += [o.to_json() for o in engine.decide_all(state, engine.due(state, account, cut, obs),
                                                           lambda a: None, obs)]
            waiting.track(account, state)
    for _, account in waiting.ready(None):  # the end: nothing earlier can come
        state = states[account]
        obs = Observation()
        out += [o.to_json() for o in engine.decide_all(state, engine.due(state, account, None, obs),
                                                       lambda a: None, obs)]
    return out


def _per_account(lines: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for x in lines:
        found.setdefault(json.loads(x)["subject"], []).append(x)
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backlogs(), st.data())
def test_any_cut_into_envelopes_gives_the_sorted_outputs(docs, data):
    n = len(docs)
    cuts = data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=8))
    lags = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 60 * DAY)), max_size=9))
    want = _per_account(_sorted_replay(docs))
    got = _per_account(_in_envelopes(docs, cuts, lags))
    assert got == want  # every account's outputs, byte for byte and in order


def test_a_whole_history_in_one_envelope_keeps_every_decision():
    """The issue's case: a handoff, a cooldown suppression a week later (the next two qualifications
    muted: one suppression per handoff), a handoff six weeks later, all applied together before
    anything is decided."""
    r = rules({"inv": {"event": "Invite Sent", "count": 3, "within": "7d", "points": 60}}, cooldown="30d")
    docs = [track("Invite Sent", at(days=d, hours=k)) for d in (0, 7, 49) for k in range(3)]
    want, summary, _ = run(r, docs)
    assert [o["type"] for o in want if o["type"] != "pql.stage"] == ["pql.handoff", "pql.suppressed", "pql.handoff"]
    assert summary.muted == 2
    engine = Engine(r)
    state, obs, first = engine.step(None, [event(d) for d in docs], "acme", lambda a: None, cut=0)
    assert first == []  # all waiting
    rest = engine.decide_all(state, engine.due(state, "acme", None, obs), lambda a: None, obs)
    assert obs.muted == 2
    assert [json.loads(o.to_json()) for o in rest if o.type != "pql.stage"] == [
        o for o in want if o["type"] != "pql.stage"]


def _through_detect(lines: list[bytes], rules, partitions: int = 4) -> list[str]:
    """The worker's parts without Kafka: the router makes envelopes for all of `lines` first (an
    ingest tier racing through a backlog), then four `detect` partitions run them in order, and the
    lines they forward (held events released by a group call) queue behind all of that."""
    import asyncio
    from collections import deque

    from streams.config import Settings
    from streams.topics import Topics
    from streams.worker import envelope
    from streams.worker.detect import Detect
    from streams.worker.route import Batch, Router

    class NoMql:
        async def get(self, account):
            return None, 0.0

    topics = Topics.of(Settings())
    parts = [Detect(Engine(rules), topics, {}, {}, NoMql(), users={}, partitions=partitions, cache_min=0)
             for _ in range(partitions)]
    batch, queue, out = Batch(), deque(), []
    router = Router(Engine(rules), topics, partitions)
    for raw in lines:
        router.route(raw, batch)
    queue += [(p, b) for (_, p), items in batch.envelopes.items() for b in envelope.pack_all(items)]
    for ticks in range(3):
        while queue:
            p, b = queue.popleft()
            result = asyncio.run(parts[p].process(b, p))
            out += [o[2].decode() for o in result.outputs]
            for account, state in result.states.items():
                parts[p].accounts[account] = state.model_dump_json(exclude_defaults=True).encode()
            for key, u in result.users.items():
                parts[p].users[key] = u.model_dump_json().encode()
            queue += [(q, b2) for q, items in result.forward.items() for b2 in envelope.pack_all(items)]
        queue += [(p, envelope.tick(2_000_000_000_000 + ticks)) for p in range(partitions)]  # idle ticks
    return out


def test_held_events_released_behind_weeks_of_their_accounts_own_events_still_count():
    """A user invites two teammates before the app sends `group` (held on the user's partition), then
    the account's own events run weeks ahead; the released invites reach the account after all of
    them. They count as they would have right after the call (issue 23: they were too_late)."""
    r = rules({"inv": {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "7d",
                       "points": 60},
               "crm": {"event": "Integration Connected", "points": 20}}, cooldown="30d")
    docs = [track("Invite Sent", at(hours=1), account=None, user="ada", email="a@x.io"),
            track("Invite Sent", at(hours=2), account=None, user="ada", email="b@x.io"),
            {"type": "group", "groupId": "acme", "userId": "ada", "messageId": "g1", "timestamp": at(hours=3),
             "traits": {"name": "Acme"}},
            track("Invite Sent", at(hours=4), user="ada", email="c@x.io")]
    docs += [track("Integration Connected", at(days=d), user="bob") for d in range(2, 40, 3)]
    lines = [json.dumps(d).encode() for d in docs]
    from streams.worker.envelope import partition_of

    assert partition_of("u:ada", 4) != partition_of("acme", 4)  # the held invites are forwarded
    out = io.StringIO()
    replay(lines, Engine(r), {}, out, io.StringIO())
    want = sorted(out.getvalue().splitlines())
    (handoff,) = [json.loads(x) for x in want if '"pql.handoff"' in x]
    assert handoff["time"] == at(hours=4).replace("Z", ".000Z")  # at the third invite
    got = sorted(x for x in _through_detect(lines, r) if '"pql.handoff"' in x or '"pql.suppressed"' in x)
    assert got == want
