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
