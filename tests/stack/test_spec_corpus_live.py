"""The spec corpus (tests/fixtures/spec/) through the worker on the real stack: every output on
pql.handoffs and pql.signals is, byte for byte, what `pql replay` prints."""
import pytest

from live import ROOT, Env, publish, read, replay


@pytest.mark.parametrize("name", ["segment", "rudderstack"])
def test_the_spec_corpus_live_is_replay(kafka, redis_url, unique, tmp_path, name):
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars["PQL_ALERT_MAX_AGE"] = "0"  # these weeks are past: not treated as a backlog in either
    events = ROOT / f"tests/fixtures/spec/{name}.jsonl"
    try:
        want = [x for x in replay(env, events, milestones=True) if '"pql.sla_breached"' not in x]
        assert any('"pql.handoff"' in x for x in want)
        env.create_topic("product.events", 2)
        env.wait_ready(env.start_worker())
        publish(env.kafka, env.topic("product.events"), events.read_bytes().splitlines())
        got = read(env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")],
                   until=lambda m: len([x for x in m if b'"pql.sla_breached"' not in x.value()]) >= len(want))
        assert sorted(m.value().decode() for m in got if b'"pql.sla_breached"' not in m.value()) == sorted(want)
    finally:
        env.stop_all()


def test_a_wrong_device_clock_live_is_corrected_or_dead_lettered_as_replay_does(kafka, redis_url, unique, tmp_path):
    """Issue 23: one event from a device a year ahead among an account's real invites. Live and in
    replay: without a sentAt that shows the skew it is dead-lettered `future` and the real invites
    qualify; with one, it is corrected and counts."""
    import json
    import time

    from detectors.timefmt import iso
    from schemas.events import parse_event

    now = int(time.time() * 1000) - 60_000
    year = 365 * 86_400_000

    def invite(mid, ms, email, **extra):
        return {"type": "track", "event": "Invite Sent", "messageId": mid, "userId": f"u-{unique}",
                "timestamp": iso(ms), "context": {"groupId": f"acct-{unique}"},
                "properties": {"invitee_email": email}, **extra}

    docs = [
        {"type": "group", "groupId": f"acct-{unique}", "userId": f"u-{unique}", "messageId": "g1",
         "timestamp": iso(now - 50_000), "traits": {"employees": "250", "name": "Clockwork"}},
        invite("i1", now - 40_000, "a@c.example"),
        invite("i2", now - 30_000 + year, "b@c.example", receivedAt=iso(now - 29_000)),  # no sentAt
        invite("i3", now - 20_000 + year, "c@c.example", receivedAt=iso(now - 19_000), sentAt=iso(now - 19_500 + year)),
        invite("i4", now - 10_000, "d@c.example"),
    ]
    lines = [json.dumps(d).encode() for d in docs]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    env = Env(kafka, redis_url, unique, tmp_path)
    try:
        res = env.pql("replay", str(events), "--rules", str(ROOT / "examples/rules.yaml"), "--processed-at", iso(now))
        assert res.returncode == 0 and "invalid future: 1 (lines 3)" in res.stderr and "clock corrected: 1" in res.stderr
        want = [json.loads(x) for x in res.stdout.splitlines()]
        assert [w["type"] for w in want] == ["pql.handoff"]
        assert [e["messageId"] for e in want[0]["data"]["evidence"]["team_invites"]] == ["i1", "i3", "i4"]
        env.wait_ready(env.start_worker())
        publish(env.kafka, env.topic("product.events"), lines)
        got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= 1)
        assert [json.loads(m.value()) for m in got] == want
        dead = read(env.kafka, [env.topic("pql.events.dlq")], until=lambda m: len(m) >= 1, idle=1)
        assert [(dict(m.headers())["pql.error.reason"], parse_event(m.value()).messageId) for m in dead] == \
            [(b"future", "i2")]
    finally:
        env.stop_all()
