"""Bursts and backlogs on the real stack (issue 23): eight weeks of history, published before the
worker starts (in time order, and sorted by account then time as a warehouse export writes it) or
while it runs. The worker publishes replay's handoffs, each once."""
import json
from collections import Counter
import pytest

from live import Env, eight_weeks, publish, read, replay

def by_account(lines: list[bytes]) -> list[bytes]:
    """Sorted by account, then time: what an export from a warehouse table looks like."""
    def key(line: bytes):
        try:
            doc = json.loads(line)
            who = doc.get("groupId") or (doc.get("context") or {}).get("groupId") or doc.get("userId") \
                or doc.get("anonymousId") or ""
            return (0, who.split("-u")[0], doc.get("timestamp", ""))
        except ValueError:
            return (1, "", "")
    return sorted(lines, key=key)


@pytest.mark.parametrize("order,before", [("time", True), ("account", True), ("time", False), ("account", False)])
def test_a_backlog_of_eight_weeks_gives_replays_handoffs(kafka, redis_url, unique, tmp_path, order, before):
    lines = eight_weeks(count=16_000)
    if order == "account":
        lines = by_account(lines)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars["PQL_ALERT_MAX_AGE"] = "0"  # (backfill flags: replay and the worker would decide them at other clocks)
    try:
        want_bytes = sorted(x for x in replay(env, events) if '"pql.handoff"' in x)
        want = sorted(json.loads(x)["id"] for x in want_bytes)
        assert len(want) >= 20
        env.create_topic("product.events", 4)
        send = (lambda: publish(env.kafka, env.topic("product.events"), lines)) if order == "time" else (
            lambda: env.pql("publish", str(events)))  # keys a user's lines by its group call's account
        if before:  # a first deployment over a retained topic
            send()
        worker = env.start_worker()
        env.wait_ready(worker)
        if not before:
            send()
        got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= len(want), idle=2,
                   timeout=180)
        (tmp_path / "got.jsonl").write_bytes(b"\n".join(m.value() for m in got))  # kept for a failure's diagnosis
        (tmp_path / "want.jsonl").write_text("\n".join(want_bytes))
        ids = Counter(json.loads(m.value())["id"] for m in got)
        assert [i for i, n in ids.items() if n > 1] == []  # each once
        assert sorted(ids) == want
        assert sorted(m.value().decode() for m in got) == want_bytes  # evidence, scores, fit: byte for byte
    finally:
        env.stop_all()
