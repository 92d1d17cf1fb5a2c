"""Real clients (issue 23): Apache Kafka's Java client produces the input as CDP Kafka destinations
do (keyed by userId, zstd, the default murmur2 partitioner, headers), and a Java consumer with
isolation.level=read_committed reads pql.handoffs: the ids are replay's, each once. The input is
eight weeks of history, produced before the worker starts (a backlog)."""
import json
import subprocess
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from live import ROOT, Env, eight_weeks, replay

LIBS = ROOT / ".stack" / "kafka-libs"  # fetched by deploy/stack.sh with Maven (kafka-clients among them)


def java(*args: str, timeout: float = 240) -> str:
    res = subprocess.run(["java", "-cp", f"{LIBS}/*", str(ROOT / "tests/stack/java/CdpClient.java"), *args],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_java_producer_and_read_committed_consumer(kafka, redis_url, unique, tmp_path):
    env = Env(kafka, redis_url, unique, tmp_path)
    lines = eight_weeks(accounts=200, count=16_000, seed=41)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    try:
        want = sorted(json.loads(x)["id"] for x in replay(env, events) if '"pql.handoff"' in x)
        assert len(want) >= 10
        env.create_topic("product.events", 4)
        assert java("produce", kafka, env.topic("product.events"), str(events)).strip() == f"sent {len(lines)}"
        env.wait_ready(env.start_worker())
        out = java("consume", kafka, env.topic("pql.handoffs"), str(len(want)), "150000")
        got = Counter(json.loads(x)["id"] for x in out.splitlines() if x.startswith("{"))
        assert [i for i, n in got.items() if n > 1] == []
        assert sorted(got) == want
        # the input really is as a Java destination writes it: keyed by user, spread by murmur2, headers
        c = Consumer({"bootstrap.servers": kafka, "group.id": f"peek{unique}", "enable.auto.commit": False})
        c.assign([TopicPartition(env.topic("product.events"), p, 0) for p in range(4)])
        seen: list = []
        while len(seen) < len(lines) and (batch := c.consume(1000, timeout=5)):
            seen += [m for m in batch if m.error() is None]
        c.close()
        assert {m.partition() for m in seen} == {0, 1, 2, 3}
        assert all(dict(m.headers())["x-cdp-destination"] == b"java-test" for m in seen)
        assert any(m.key() and m.key().startswith(b"acct-") and b"-u" in m.key() for m in seen)
    finally:
        env.stop_all()
