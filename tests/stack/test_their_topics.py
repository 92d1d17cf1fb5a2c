"""Their topics, not ours (issue 23): the worker reads a team's existing input topics (here one per
call type, as RudderStack's multi-topic mode writes them, with other partition counts, keyed by
user) as they are, publishes replay's handoffs, and never creates or alters a topic it does not own."""
import json
import subprocess
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from live import PQL, ROOT, Env, read, replay
from streams.tools.simulate import Simulator

TYPES = {"track": 3, "identify": 1, "group": 2, "page": 1}  # topic per call type -> partitions


def _describe(admin: AdminClient, names: list[str]) -> dict:
    """name -> (partitions, its topic configs): to see nothing was altered. (Topics just created may
    take a moment to show in the metadata.)"""
    deadline = time.monotonic() + 15
    meta = admin.list_topics(timeout=15).topics
    while any(n not in meta for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)
        meta = admin.list_topics(timeout=15).topics
    configs = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    return {res.name: (len(meta[res.name].partitions),
                       {k: v.value for k, v in f.result(timeout=15).items()}) for res, f in configs.items()}


def test_the_worker_reads_one_topic_per_call_type_and_creates_none_of_theirs(kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    theirs = {kind: f"rs{unique}.{kind}" for kind in TYPES}
    crm, responses = f"crm{unique}.lifecycle", f"sales{unique}.answers"
    admin = AdminClient({"bootstrap.servers": kafka})
    for f in admin.create_topics([NewTopic(theirs[k], n, 1, config={"retention.ms": "2592000000"})
                                  for k, n in TYPES.items()] + [NewTopic(crm, 1, 1), NewTopic(responses, 2, 1)]
                                 ).values():
        f.result(timeout=30)
    before = _describe(admin, [*theirs.values(), crm, responses])
    env.vars.update({"PQL_EVENTS_TOPICS": ",".join(theirs.values()), "PQL_CRM_TOPICS": crm,
                     "PQL_RESPONSES_TOPICS": responses, "PQL_ALERT_MAX_AGE": "0"})
    lines = list(Simulator(accounts=120, seed=31, late_group=0.3).events(6000))
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    try:
        want = sorted(json.loads(x)["id"] for x in replay(env, events) if '"pql.handoff"' in x)
        assert len(want) >= 10
        worker = env.start_worker()
        env.wait_ready(worker)
        p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "compression.type": "zstd"})
        for line in lines:  # keyed by user, as CDP destinations key; malformed lines to the track topic
            try:
                doc = json.loads(line)
                kind, key = doc.get("type"), doc.get("userId") or doc.get("anonymousId")
            except ValueError:
                kind, key = "track", None
            p.produce(theirs.get(kind, theirs["track"]), line, key=key)
        assert p.flush(30) == 0
        got = read(kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= len(want), idle=4)
        assert sorted(json.loads(m.value())["id"] for m in got) == want
        # a sales response on their responses topic is read there
        h = json.loads(got[0].value())
        p.produce(responses, json.dumps({"handoff_id": h["id"], "account_id": h["subject"], "status": "accepted",
                                         "timestamp": h["time"]}).encode(), key=h["subject"].encode())
        assert p.flush(30) == 0
        signals = read(kafka, [env.topic("pql.signals")],
                       until=lambda m: any(b'"accepted"' in x.value() for x in m), idle=0.5, timeout=60)
        assert any(b'"accepted"' in x.value() and h["id"].encode() in x.value() for x in signals)
    finally:
        env.stop_all()
    meta = admin.list_topics(timeout=15).topics
    assert env.topic("product.events") not in meta and env.topic("crm.lifecycle") not in meta
    assert env.topic("sales.responses") not in meta and env.topic("pql.handoffs") in meta  # ours: created
    assert _describe(admin, [*theirs.values(), crm, responses]) == before  # theirs: untouched


def test_a_missing_topic_of_theirs_stops_startup_naming_it(kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars["PQL_EVENTS_TOPICS"] = f"nope{unique}.track"
    res = subprocess.run([*PQL, "worker"], env=env.env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert f"PQL_EVENTS_TOPICS: topic 'nope{unique}.track' does not exist" in res.stderr
    assert f"nope{unique}.track" not in AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=15).topics
