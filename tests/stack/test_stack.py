"""The real services answer: a message round-trips through Kafka and a key through Redis."""
import time

import redis
from confluent_kafka import Consumer, Producer


def test_kafka_round_trip(kafka, make_topics, unique):
    topic = f"roundtrip-{unique}"
    make_topics(topic)
    p = Producer({"bootstrap.servers": kafka})
    p.produce(topic, key=b"acct-1", value=b'{"hello":"kafka"}')
    assert p.flush(10) == 0
    c = Consumer({"bootstrap.servers": kafka, "group.id": f"g-{unique}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got, deadline = None, time.time() + 30
    while got is None and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got = m
    c.close()
    assert got is not None, "no message came back from the broker"
    assert (got.key(), got.value()) == (b"acct-1", b'{"hello":"kafka"}')


def test_kafka_rejects_unknown_topic_auto_creation(kafka, unique):
    """Auto-creation is off: the project creates its own topics."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka})
    p = Producer({"bootstrap.servers": kafka, "message.timeout.ms": 2000})
    p.produce(f"never-created-{unique}", value=b"x")
    p.flush(5)
    assert f"never-created-{unique}" not in admin.list_topics(timeout=10).topics


def test_redis_round_trip(redis_url, unique):
    r = redis.Redis.from_url(redis_url)
    key = f"test:{unique}:k"
    r.hset(key, mapping={"stage": "MQL", "owner": "rep-1"})
    assert r.hgetall(key) == {b"stage": b"MQL", b"owner": b"rep-1"}
    r.delete(key)
