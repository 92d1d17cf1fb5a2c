"""`pql replay` as a user runs it, and properties that must hold for any input."""
import io
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.engine import Engine
from helpers import at, group, track
from schemas.rules import load_rules
from streams.tools.replay import replay

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples/rules.yaml"


def _pql(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], capture_output=True, text=True, cwd=cwd)


def _write(path, docs):
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))


SAMPLE = [
    group("acme", at(), employees=40, name="Acme"),
    track("Invite Sent", at(hours=1), invitee_email="a@x.io"),
    "{not json",
    track("Invite Sent", at(hours=2), invitee_email="b@x.io"),
    '{"type":"track","event":"Invite Sent","messageId":"x","timestamp":"yesterday","context":{"groupId":"acme"}}',
    '{"type":"track","event":"Invite Sent","timestamp":"2026-11-01T00:00:00Z"}',
    '{"type":"bogus","messageId":"y","timestamp":"2026-11-01T00:00:00Z"}',
    "[1, 2]",
    track("Invite Sent", at(hours=3), invitee_email="c@x.io"),
]


def test_replay_reports_bad_lines_and_goes_on(tmp_path):
    f = tmp_path / "events.jsonl"
    _write(f, SAMPLE)
    res = _pql("replay", str(f), "--rules", str(RULES))
    assert res.returncode == 0, res.stderr
    for line, reason in [(3, "not_json"), (5, "bad_timestamp"), (6, "missing_field"), (7, "unknown_type"),
                         (8, "not_object")]:
        assert f"line {line}: {reason}:" in res.stderr
    out = [json.loads(x) for x in res.stdout.splitlines()]
    assert [o["type"] for o in out] == ["pql.handoff"]
    assert "handoffs:        1" in res.stderr and "events read:     9 (4 valid, 5 invalid)" in res.stderr


def test_replay_is_byte_identical_across_runs(tmp_path):
    f = tmp_path / "events.jsonl"
    _write(f, SAMPLE * 3)
    a = _pql("replay", str(f), "--rules", str(RULES), "--milestones")
    b = _pql("replay", str(f), "--rules", str(RULES), "--milestones")
    assert a.returncode == 0 and a.stdout and a.stdout == b.stdout


def test_replay_uses_mql_file(tmp_path):
    f, m = tmp_path / "events.jsonl", tmp_path / "mql.jsonl"
    _write(f, SAMPLE)
    m.write_text('{"account_id":"acme","stage":"sal","owner":"rep-3"}\n')
    out = json.loads(_pql("replay", str(f), "--rules", str(RULES), "--mql", str(m)).stdout)
    assert (out["data"]["precedence"], out["data"]["owner"]) == ("pql_supersedes_mql", "rep-3")
    m.write_text('{"account_id":"acme","stage":"sal"}\n{"account_id":"b","stage":"Hot"}\n')
    bad = _pql("replay", str(f), "--rules", str(RULES), "--mql", str(m))
    assert bad.returncode == 2 and f"{m}:2: stage" in bad.stderr


def test_replay_refuses_a_bad_rules_file(tmp_path):
    f, r = tmp_path / "events.jsonl", tmp_path / "rules.yaml"
    _write(f, SAMPLE)
    r.write_text(RULES.read_text().replace("  score: 60", "  score: lots"))
    res = _pql("replay", str(f), "--rules", str(r))
    assert res.returncode == 2 and "qualify.score" in res.stderr and res.stdout == ""


# -- properties -------------------------------------------------------------------------------------

ENGINE_RULES = load_rules(RULES)
names = st.sampled_from(["Invite Sent", "Usage Recorded", "Source Connected", "Job Run", "Results Viewed",
                         "Integration Connected", "Page Viewed"])
events = st.builds(
    lambda name, hour, acct, user, mid, n, used: (
        group(acct, at(hours=hour), user=user, mid=f"g{mid}", employees=n)
        if name == "Page Viewed" else
        track(name, at(hours=hour), account=acct if n % 3 else None, user=user, mid=f"m{mid}",
              invitee_email=f"{n}@x.io", used=used, limit=100, integration=["hubspot", "slack"][n % 2])
    ),
    names, st.integers(0, 24 * 60), st.sampled_from(["a1", "a2", "a3"]), st.sampled_from(["u1", "u2"]),
    st.integers(0, 300), st.integers(0, 50), st.integers(0, 120),
)


def _run(lines):
    out, err = io.StringIO(), io.StringIO()
    replay(lines, Engine(ENGINE_RULES), {}, out, err, milestones=True)
    return out.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, max_size=120))
def test_replay_is_deterministic(docs):
    lines = [json.dumps(d).encode() for d in docs]
    assert _run(lines) == _run(lines)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                          st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                       max_leaves=10).map(lambda v: json.dumps(v).encode())),
                max_size=30))
def test_junk_never_crashes(lines):
    lines = [ln for ln in lines if b"\n" not in ln]
    out, err = io.StringIO(), io.StringIO()
    s = replay(lines, Engine(ENGINE_RULES), {}, out, err)
    assert s.lines == sum(1 for ln in lines if ln.strip())


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
stamps = st.one_of(scalars, st.datetimes(timezones=st.just(__import__("datetime").timezone.utc)).map(
    lambda d: d.isoformat()), st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2026-13-01T00:00:00Z"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["track", "group", "identify", "page", "screen", "alias"]),
    "event": st.one_of(names, scalars), "messageId": st.one_of(st.text(max_size=6), scalars),
    "timestamp": stamps, "userId": st.one_of(st.sampled_from(["u1", "u2"]), scalars),
    "groupId": st.one_of(st.sampled_from(["a1", "a2"]), scalars),
    "context": st.one_of(st.fixed_dictionaries({"groupId": st.one_of(st.just("a1"), scalars)}), scalars),
    "properties": st.one_of(st.fixed_dictionaries({"used": scalars, "limit": scalars, "invitee_email": scalars,
                                                   "integration": scalars}), scalars),
    "traits": st.one_of(st.fixed_dictionaries({"employees": scalars}), scalars),
}), max_size=40))
def test_hostile_field_values_never_crash(docs):
    lines = [json.dumps(d).encode() for d in docs]
    out, err = io.StringIO(), io.StringIO()
    s = replay(lines, Engine(ENGINE_RULES), {}, out, err, milestones=True)
    assert s.lines == len(lines)


def _handoff(tmp_path, docs):
    f = tmp_path / "events.jsonl"
    _write(f, docs)
    out = [json.loads(x) for x in _pql("replay", str(f), "--rules", str(RULES)).stdout.splitlines()]
    return f, [o for o in out if o["type"] == "pql.handoff"]


def _responses(tmp_path, *docs):
    r = tmp_path / "responses.jsonl"
    _write(r, docs)
    return r


def _qualify(day: int) -> list:
    """Three invites on `day`: one qualification (the example rules' team_invites, 60 points)."""
    return [track("Invite Sent", at(days=day, hours=h), invitee_email=f"{day}-{h}@x.io") for h in (1, 2, 3)]


def test_replay_applies_sales_responses_in_time_order(tmp_path):
    first = [group("acme", at(), employees=40, name="Acme"), *_qualify(0)]
    f, handoffs = _handoff(tmp_path, first + _qualify(40))  # day 40: after the 30-day cooldown
    h = handoffs[0]  # at hour 3; the example rules give sales 1 h
    accepted = {"handoff_id": h["id"], "account_id": "acme", "status": "accepted", "by": "rep-1",
                "timestamp": at(hours=4, minutes=10)}
    r = _responses(tmp_path, accepted)
    res = _pql("replay", str(f), "--rules", str(RULES), "--stages", "--responses", str(r), "--now", at(days=60))
    assert res.returncode == 0, res.stderr
    out = [json.loads(x) for x in res.stdout.splitlines()]
    stages = [(o["type"], o["data"].get("stage"), o["data"].get("late")) for o in out if o["type"] != "pql.handoff"]
    # live: the clock runs out 1 h after the handoff, the answer comes 10 min later (late), and the
    # account stays with sales: the day-40 qualification is suppressed, no second handoff
    assert ("pql.sla_breached", "sla_breached", False) in stages and ("pql.stage", "accepted", True) in stages
    suppressed = [o["data"]["reason"] for o in out if o["type"] == "pql.suppressed"]
    assert suppressed == ["already_in_sales"] and sum(o["type"] == "pql.handoff" for o in out) == 1
    assert "responses:       recorded 1" in res.stderr
    # without the response, the same events give a second handoff after the cooldown
    plain = _pql("replay", str(f), "--rules", str(RULES))
    assert sum(json.loads(x)["type"] == "pql.handoff" for x in plain.stdout.splitlines()) == 2


def test_replay_answer_in_time_stops_the_clock(tmp_path):
    f, (h,) = _handoff(tmp_path, [group("acme", at(), employees=40), *_qualify(0)])
    r = _responses(tmp_path, {"handoff_id": h["id"], "account_id": "acme", "status": "rejected",
                              "reason": "no_budget", "timestamp": at(hours=3, minutes=30)})
    res = _pql("replay", str(f), "--rules", str(RULES), "--stages", "--responses", str(r), "--now", at(days=2))
    out = [json.loads(x) for x in res.stdout.splitlines()]
    assert not any(o["type"] == "pql.sla_breached" for o in out)
    (rejected,) = [o for o in out if o["data"].get("stage") == "rejected"]
    assert rejected["data"]["reason"] == "no_budget" and not rejected["data"].get("late")


def test_replay_reports_bad_and_unknown_responses(tmp_path):
    f, (h,) = _handoff(tmp_path, [group("acme", at(), employees=40), *_qualify(0)])
    r = _responses(tmp_path, {"handoff_id": "nope", "account_id": "acme", "status": "accepted",
                              "timestamp": at(hours=4)})
    res = _pql("replay", str(f), "--rules", str(RULES), "--responses", str(r))
    assert res.returncode == 0 and "responses line 1: unknown_handoff: handoff_id nope" in res.stderr
    r = _responses(tmp_path, {"handoff_id": h["id"], "account_id": "acme", "status": "accepted",
                              "timestamp": at(hours=4)},
                   {"handoff_id": h["id"], "account_id": "acme", "status": "rejected", "timestamp": at(hours=5)})
    bad = _pql("replay", str(f), "--rules", str(RULES), "--stages", "--responses", str(r))
    assert bad.returncode == 0 and "responses line 2: bad_response: reason: a rejection needs a reason" in bad.stderr
    assert [json.loads(x)["data"].get("stage") for x in bad.stdout.splitlines()][-1] == "accepted"  # line 1 applied


def test_backfill_flags_follow_the_decision_time(tmp_path):
    """PQL_ALERT_MAX_AGE: decided at the stream time (a live history) a handoff is fresh and gets its
    SLA clock; decided by a worker started 60 days later (--processed-at) it is a backfill: flagged,
    same id, no clock, no breach."""
    f = tmp_path / "events.jsonl"
    _write(f, [group("acme", at(), employees=40, name="Acme"), *_qualify(0)])
    live = _pql("replay", str(f), "--rules", str(RULES), "--now", at(days=60))
    late = _pql("replay", str(f), "--rules", str(RULES), "--now", at(days=60), "--processed-at", at(days=60))
    off = _pql("replay", str(f), "--rules", str(RULES), "--now", at(days=60), "--processed-at", at(days=60),
               "--alert-max-age", "0")
    types = {name: [(o["type"], o["data"].get("backfill")) for o in map(json.loads, r.stdout.splitlines())]
             for name, r in (("live", live), ("late", late), ("off", off))}
    assert types["live"] == [("pql.handoff", False), ("pql.sla_breached", None)]
    assert types["late"] == [("pql.handoff", True)] and "handoffs:        1 (1 backfill)" in late.stderr
    assert types["off"] == types["live"]
    ids = {json.loads(r.stdout.splitlines()[0])["id"] for r in (live, late, off)}
    assert len(ids) == 1
    day_late = _pql("replay", str(f), "--rules", str(RULES), "--processed-at", at(hours=3 + 23))
    assert '"backfill":false' in day_late.stdout  # 23 h old: within the default day
    assert _pql("replay", str(f), "--rules", str(RULES), "--processed-at", "soon").returncode == 2
