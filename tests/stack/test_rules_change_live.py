"""A rules deploy on a running pipeline (docs/operations.md "Changing rules"): a worker runs the
first half of a history with examples/rules.yaml, is stopped, and comes back with rules that change
points and the score, add a milestone, remove one, lengthen a window and loosen the fit. What it
publishes over the whole history equals `pql replay --switch` at the same line, byte for byte."""
import json

import yaml

from live import ROOT, Env, read, replay
from streams.tools.simulate import Simulator


def new_rules(path):
    r = yaml.safe_load((ROOT / "examples/rules.yaml").read_text())
    r["version"] = "changed"
    r["qualify"]["score"] = 50                                   # score
    r["milestones"]["activation"]["points"] = 50                 # points
    del r["milestones"]["usage_limit"]                           # removed
    r["milestones"]["team_invites"]["within"] = "10d"            # window
    r["milestones"]["exports"] = {"event": "Report Exported", "count": 3, "within": "3d", "points": 30}  # added
    r["fit"]["traits"]["employees"] = {"gte": 5}                 # fit
    path.write_text(yaml.safe_dump(r))
    return path


def test_a_worker_restarted_with_changed_rules_publishes_what_replay_across_the_change_does(
        kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars["PQL_ALERT_MAX_AGE"] = "0"  # (an old week: not a backlog)
    try:
        lines = list(Simulator(accounts=150, seed=21).events(8000))
        half = len(lines) // 2
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"\n".join(lines) + b"\n")
        changed = new_rules(tmp_path / "changed.yaml")
        expected = replay(env, events, milestones=True, now="now", switch=f"{half + 1}:{changed}")
        decided = {json.loads(x)["data"].get("rules_version") for x in expected if '"pql.handoff"' in x}
        assert decided == {"2026-12-07", "changed"}, decided
        env.create_topic("product.events", 1)  # one input partition: the worker sees the file's order
        first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
        first.write_bytes(b"\n".join(lines[:half]) + b"\n")
        second.write_bytes(b"\n".join(lines[half:]) + b"\n")
        worker = env.start_worker()
        assert env.pql("publish", str(first)).returncode == 0
        read(env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")], until=lambda m: len(m) > 0, idle=8,
             timeout=120)  # until nothing more comes: the first half is decided under the first rules
        worker.terminate()
        assert worker.wait(60) == 0
        env.start_worker(PQL_RULES=str(changed))
        assert env.pql("publish", str(second)).returncode == 0
        got = read(env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")],
                   until=lambda m: len(m) >= len(expected), idle=4, timeout=180)
        assert sorted(m.value().decode() for m in got) == sorted(expected)
    finally:
        env.stop_all()
