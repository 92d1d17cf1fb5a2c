"""Event sets, seat growth, trends and decay (issue 27) in the live worker: over a six-week history
published unkeyed on four partitions, the worker publishes what `pql replay` prints, milestones
included."""
import json

import yaml

from live import ROOT, Env, read, replay
from streams.tools.simulate import Simulator, start_by_now
from test_worker import publish_unkeyed


def test_sets_seats_trends_and_decay_live_equal_replay(kafka, redis_url, unique, tmp_path):
    rules = yaml.safe_load((ROOT / "examples/rules.yaml").read_text())  # (seat_growth: a set, distinct people)
    rules["version"] = "features"
    rules["milestones"]["busy_pages"] = {"type": "page", "event": "*", "count": 20, "within": "7d", "points": 10}
    rules["milestones"]["usage_growth"] = {"event": "Usage Recorded", "growth": {"over": "10d", "at_least": 1.5, "min": 4},
                                           "points": 30}
    rules["milestones"]["crm_integration"]["fades"] = "5d"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    env = Env(kafka, redis_url, unique, tmp_path, rules=path)
    env.vars["PQL_ALERT_MAX_AGE"] = "0"
    try:
        six_weeks = 42 * 86_400_000  # (ending in the past: the worker refuses events from the future)
        lines = list(Simulator(accounts=200, seed=8, late_group=0.3, span_ms=six_weeks,
                               start=start_by_now(six_weeks)).events(12_000))
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"\n".join(lines) + b"\n")
        want = [x for x in replay(env, events, rules=path, milestones=True) if '"pql.sla_breached"' not in x]
        reached = {json.loads(x)["data"]["milestone"] for x in want if '"pql.milestone"' in x}
        assert {"seat_growth", "busy_pages", "usage_growth"} <= reached, reached
        assert any('"pql.handoff"' in x for x in want)
        env.create_topic("product.events", 4)
        env.start_worker()
        publish_unkeyed(env.kafka, env.topic("product.events"), lines)
        got = read(env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")],
                   until=lambda m: sum(b'"pql.sla_breached"' not in x.value() for x in m) >= len(want), idle=4)
        live = sorted(m.value().decode() for m in got if b'"pql.sla_breached"' not in m.value())
        missing, extra = sorted(set(want) - set(live)), sorted(set(live) - set(want))
        assert live == sorted(want), (f"{len(missing)} missing, {len(extra)} unexpected:\n"
                                      + "\n".join(["- " + x for x in missing[:6]] + ["+ " + x for x in extra[:6]]))
    finally:
        env.stop_all()
