"""`pql bootstrap` (streams/tools/bootstrap.py): a milestone added to the rules sees the past.

A worker runs a week of history with examples/rules.yaml and stops. Bootstrap, given the same history
sorted by account (an export) and rules with a new milestone, rebuilds the account states: the new
milestone's decisions come out flagged backfill, exactly those a replay of the new rules makes for the
accounts the old rules had not handed off (the cooldown holds for the others), and a crash half way
leaves no trace."""
import json
import subprocess

import yaml

from helpers import export_by_account
from live import PQL, ROOT, Env, read, replay
from streams.tools.simulate import Simulator


def test_bootstrap_rebuilds_state_from_history_in_any_order_once_and_all_or_nothing(kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars["PQL_ALERT_MAX_AGE"] = "0"
    try:
        lines = list(Simulator(accounts=150, seed=31).events(8000))
        history = tmp_path / "history.jsonl"
        history.write_bytes(b"\n".join(lines) + b"\n")
        by_account = tmp_path / "by-account.jsonl"  # an export sorted by account, then time
        by_account.write_bytes(b"\n".join(export_by_account(lines)) + b"\n")
        rules = yaml.safe_load((ROOT / "examples/rules.yaml").read_text())
        rules["version"] = "with-exports"
        rules["milestones"]["exports"] = {"event": "Report Exported", "count": 3, "within": "3d", "points": 60}
        new = tmp_path / "new.yaml"
        new.write_text(yaml.safe_dump(rules))

        old_ids = [json.loads(x) for x in replay(env, history) if '"pql.handoff"' in x]
        env.create_topic("product.events", 1)
        worker = env.start_worker()
        assert env.pql("publish", str(history)).returncode == 0
        got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= len(old_ids), idle=3)
        assert sorted(json.loads(m.value())["id"] for m in got) == sorted(h["id"] for h in old_ids)
        busy = env.pql("bootstrap", str(by_account), "--rules", str(new))
        assert busy.returncode == 1 and "running: stop them first" in busy.stderr, busy.stderr
        worker.terminate()
        assert worker.wait(60) == 0

        changelog = env.vars["PQL_APP_ID"] + "-accounts-changelog"
        before = {m.key(): m.value() for m in read(env.kafka, [changelog], until=lambda m: True, idle=2)}
        crashed = subprocess.run([*PQL, "bootstrap", str(by_account), "--rules", str(new), "--crash-after", "40"],
                                 env=env.env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert crashed.returncode == 3 and "crashing after 40 records" in crashed.stderr, crashed.stderr
        after_crash = {m.key(): m.value() for m in read(env.kafka, [changelog], until=lambda m: True, idle=2)}
        assert after_crash == before  # nothing of the aborted transaction is read
        assert len(read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: True, idle=1)) == len(old_ids)

        done = env.pql("bootstrap", str(by_account), "--rules", str(new))
        assert done.returncode == 0, done.stderr
        assert " 0 events too late" in done.stderr, done.stderr  # the account-sorted export, in time order
        handed = {h["subject"] for h in old_ids}
        want = sorted(json.loads(x)["id"] for x in replay(env, history, rules=new)
                      if '"pql.handoff"' in x and json.loads(x)["subject"] not in handed)
        assert want, "the new milestone qualifies accounts the old rules did not"
        out = [json.loads(m.value()) for m in read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: True, idle=2)]
        new_handoffs = [h for h in out if h["data"]["rules_version"] == "with-exports"]
        assert sorted(h["id"] for h in new_handoffs) == want
        assert all(h["data"]["backfill"] for h in new_handoffs)
        states = {json.loads(m.key()): json.loads(m.value())
                  for m in read(env.kafka, [changelog], until=lambda m: True, idle=2)}
        assert sum("exports" in s.get("hits", {}) for s in states.values()) >= len(want)
        for h in old_ids:  # the old handoffs are in the rebuilt states: cooldown
            assert h["id"] in {x["id"] for x in states[h["subject"]]["sales"]["handoffs"]}
    finally:
        env.stop_all()
