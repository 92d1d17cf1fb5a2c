"""The live worker against the real stack: same results as replay, DLQ, CRM, settings."""
import json
import time

import pytest
import redis

from live import Env, publish, read, replay
from schemas.events import InvalidEvent, parse_event
from streams.tools.simulate import Simulator


@pytest.fixture
def env(kafka, redis_url, unique, tmp_path):
    e = Env(kafka, redis_url, unique, tmp_path)
    yield e
    e.stop_all()


@pytest.mark.parametrize("store,own_process", [("memory://", False), ("rocksdb://", False), ("memory://", True)])
def test_live_equals_replay(env, tmp_path, store, own_process):
    """Same events, same MQL state: the worker publishes exactly what `pql replay` prints (also with
    the ingest tier in its own process, PQL_INGEST_PROCESS)."""
    env.vars["PQL_ALERT_MAX_AGE"] = "0"  # this old week is not treated as a backlog (test_sales.py tests that)
    lines = list(Simulator(accounts=150, seed=3).events(8000))
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    mql = tmp_path / "mql.jsonl"
    mql.write_text("\n".join(json.dumps({"account_id": f"acct-{i:06d}", "stage": stage, "owner": f"rep-{i % 7}"})
                             for i, stage in zip(range(0, 150, 5), ["MQL", "SAL", "SQL", "Recycled", "Customer"] * 10)))
    assert env.pql("mql", "import", str(mql)).returncode == 0
    # The simulated week is in the past: every handoff's SLA ran out long ago, so the live worker
    # breaches each at its first tick, exactly what replay's clock read "now" predicts.
    expected = replay(env, events, mql=mql, milestones=True, now="now")
    assert any('"pql.handoff"' in x for x in expected) and any('"pql_supersedes_mql"' in x for x in expected)
    assert sum('"pql.sla_breached"' in x for x in expected) == sum('"pql.handoff"' in x for x in expected)
    env.create_topic("product.events", 1)  # one input partition: the worker sees the file's order
    worker = env.start_worker(PQL_STORE=store, PQL_INGEST_PROCESS=str(own_process).lower())
    sent = env.pql("publish", str(events))  # the CLI a user runs for backfills
    assert sent.returncode == 0 and f"published {len(lines)} events" in sent.stderr, sent.stderr
    got = read(env.kafka, [env.topic("pql.handoffs"), env.topic("pql.signals")],
               until=lambda m: len(m) >= len(expected))
    assert sorted(m.value().decode() for m in got) == sorted(expected)
    handoffs = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: True, idle=0.5)
    assert {json.loads(m.value())["subject"] for m in handoffs} == {m.key().decode() for m in handoffs}
    assert all(dict(m.headers())["content-type"] == b"application/cloudevents+json" for m in handoffs)
    # the ingest tier's counts reach /metrics, from either process (relayed every second)
    want, deadline = sum(map(valid, lines)), time.time() + 15
    while (consumed := sum(float(ln.rsplit(" ", 1)[1]) for ln in env.metrics(worker).splitlines()
                           if ln.startswith("pql_events_consumed_total{"))) != want and time.time() < deadline:
        time.sleep(0.2)
    assert consumed == want


def valid(line: bytes) -> bool:
    try:
        parse_event(line)
    except InvalidEvent:
        return False
    return True


BAD = [
    (b"{not json", "not_json"),
    (b'{"type":"track","event":"Job Run","timestamp":"2026-11-20T00:00:00Z"}', "missing_field"),
    (b'{"type":"wat","messageId":"x1","timestamp":"2026-11-20T00:00:00Z"}', "unknown_type"),
    (b'{"type":"track","event":"Job Run","messageId":"x2","timestamp":"soon"}', "bad_timestamp"),
    (b"[1,2,3]", "not_object"),
    (b'{"type":"track","event":"Usage Recorded","messageId":"x3","timestamp":"2026-11-20T00:00:00Z",'
     b'"context":{"groupId":"a1"},"properties":{"used":NaN,"limit":100}}', "not_json"),
    (b'{"type":"track","event":"Job Run","messageId":"x4","timestamp":"2026-11-20T00:00:00Z","userId":"\\ud800"}',
     "not_json"),
    (b'{"type":"group","groupId":"a\\tb","messageId":"x5","timestamp":"2026-11-20T00:00:00Z","userId":"u"}',
     "invalid_field"),
    (b'{"type":"track","event":"Job Run","messageId":"x6","timestamp":"2026-11-20T00:00:00Z","properties":'
     + b"[" * 3000 + b"]" * 3000 + b"}", "not_json"),
]


def test_malformed_events_go_to_the_dlq_with_reason_and_origin(env):
    env.start_worker()
    good = json.dumps({"type": "track", "event": "Job Run", "messageId": "ok1", "timestamp": "2026-11-20T00:00:00Z",
                       "context": {"groupId": "a1"}}).encode()
    huge = good.replace(b'"ok1"', b'"big1"').replace(b"}}", b'}, "properties": {"blob": "' + b"x" * 100_000 + b'"}}')
    publish(env.kafka, env.topic("product.events"), [raw for raw, _ in BAD] + [huge, good])
    dlq = read(env.kafka, [env.topic("pql.events.dlq")], until=lambda m: len(m) >= len(BAD) + 1)
    assert len(dlq) == len(BAD) + 1
    by_value = {m.value(): dict(m.headers()) for m in dlq}
    big = by_value.pop(huge[:65536])  # the DLQ keeps the head of a record over the size limit
    assert big["pql.error.reason"] == b"too_large" and big["pql.error.size"] == str(len(huge)).encode()
    for raw, reason in BAD:
        h = by_value[raw]  # the original bytes, unchanged
        assert h["pql.error.reason"].decode() == reason
        assert h["pql.error.topic"].decode() == env.topic("product.events")
        assert int(h["pql.error.partition"]) >= 0 and int(h["pql.error.offset"]) >= 0
        assert h["pql.error.detail"]


def test_crm_lifecycle_updates_redis_and_rejects_bad_records(env):
    env.start_worker()
    r = redis.Redis.from_url(env.redis_url)
    key = f"t{env.unique}:mql:acme"
    publish(env.kafka, env.topic("crm.lifecycle"), [
        json.dumps({"account_id": "acme", "stage": "MQL", "owner": "rep-1", "timestamp": "2026-11-20T10:00:00Z"}).encode(),
        json.dumps({"account_id": "acme", "stage": "SAL", "owner": "rep-2", "timestamp": "2026-11-20T11:00:00Z"}).encode(),
        # older than what is stored: ignored
        json.dumps({"account_id": "acme", "stage": "Lead", "owner": None, "timestamp": "2026-11-20T09:00:00Z"}).encode(),
        json.dumps({"account_id": "acme", "stage": "Hot", "owner": "x"}).encode(),
    ])
    deadline = time.time() + 60
    while time.time() < deadline and r.hget(key, "stage") != b"SAL":
        time.sleep(0.3)
    time.sleep(2)
    assert r.hgetall(key) == {b"stage": b"SAL", b"owner": b"rep-2", b"updated_at": b"2026-11-20T11:00:00.000Z"}
    dlq = read(env.kafka, [env.topic("pql.events.dlq")], until=lambda m: len(m) >= 1)
    assert [dict(m.headers())["pql.error.reason"] for m in dlq] == [b"bad_crm_record"]
    assert b"stage" in dict(dlq[0].headers())["pql.error.detail"]
    got = env.pql("mql", "get", "acme")
    assert got.returncode == 0 and json.loads(got.stdout)["owner"] == "rep-2"


def test_mql_cli(env):
    assert env.pql("mql", "set", "b1", "--stage", "sql", "--owner", "rep-9").returncode == 0
    assert json.loads(env.pql("mql", "get", "b1").stdout)["stage"] == "SQL"
    bad = env.pql("mql", "set", "b1", "--stage", "Hot")
    assert bad.returncode == 2 and "stage" in bad.stderr
    assert env.pql("mql", "get", "nobody").returncode == 1


def test_bad_settings_and_rules_stop_startup(env, tmp_path):
    res = env.pql("worker", PQL_PARTITIONS="many")
    assert res.returncode == 2 and "PQL_PARTITIONS" in res.stderr
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: x\nmilestones: {}\nqualify: {score: 1, window: 1d}\n")
    res = env.pql("worker", PQL_RULES=str(rules))
    assert res.returncode == 2 and f"{rules}:2: milestones" in res.stderr
    env.create_topic("pql.handoffs", 2)  # co-partitioned output with the wrong partition count
    res = env.pql("worker")
    assert res.returncode == 2 and "PQL_PARTITIONS" in res.stderr and "pql.handoffs" in res.stderr


def test_unknown_store_is_refused(env):
    res = env.pql("worker", PQL_STORE="redis://")
    assert res.returncode == 2 and "PQL_STORE" in res.stderr and "rocksdb://" in res.stderr


def test_live_equals_replay_for_unkeyed_events_and_late_group_calls(kafka, redis_url, unique, tmp_path):
    """Issue 11: track calls without context.groupId, many before their user's group call, published
    unkeyed over 4 partitions. Three runs (each with its own app id): the handoff ids equal replay's."""
    lines = list(Simulator(accounts=120, seed=5, late_group=0.5).events(6000))
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    runs = []
    for n in range(3):
        env = Env(kafka, redis_url, f"{unique}r{n}", tmp_path / f"run{n}")
        (tmp_path / f"run{n}").mkdir()
        try:
            if n == 0:
                want = sorted(json.loads(x)["id"] for x in replay(env, events) if '"pql.handoff"' in x)
                assert len(want) >= 10
            env.create_topic("product.events", 4)
            env.start_worker()
            publish_unkeyed(env.kafka, env.topic("product.events"), lines)
            got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= len(want), idle=2)
            runs.append(sorted(json.loads(m.value())["id"] for m in got))
        finally:
            env.stop_all()
    for got in runs:
        assert got == want


def publish_unkeyed(kafka: str, topic: str, lines: list[bytes]) -> None:
    """No key at all (many Segment and RudderStack setups): the client spreads lines over partitions."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "sticky.partitioning.linger.ms": 0})
    for n, line in enumerate(lines, 1):
        p.produce(topic, line)
        if n % 500 == 0:
            p.poll(0)
    assert p.flush(30) == 0


def test_a_new_app_at_64_partitions_starts_with_its_changelogs_created_first(kafka, redis_url, unique, tmp_path):
    """The changelogs exist, with PQL_PARTITIONS partitions and Faust's configs, before the worker joins
    its group: when Faust declared them itself, the first assignment of a new 64-partition app came
    before they were in the metadata, left them out, and `eos.tables_follow_sources` stopped the
    worker (exit 70) at its first start (session 21)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    env = Env(kafka, redis_url, unique, tmp_path, partitions=64)
    try:
        worker = env.start_worker()
        env.wait_ready(worker)
        time.sleep(2)
        assert worker.poll() is None, f"worker exited; read {worker.log_path}"
    finally:
        env.stop_all()
    admin = AdminClient({"bootstrap.servers": kafka})
    names = [f"app{unique}-{t}-changelog" for t in ("accounts", "users", "clocks")]
    meta = admin.list_topics(timeout=15).topics
    assert [len(meta[n].partitions) for n in names] == [64, 64, 64]
    for res, f in admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names]).items():
        configs = f.result(timeout=15)
        assert configs["cleanup.policy"].value == "compact", res.name
        assert configs["segment.bytes"].value == str(64 * 1024 * 1024), res.name
    log = open(worker.log_path).read()
    assert "without their tables' changelog partitions" not in log
