"""Production Kafka (issue 24): a three-node KRaft cluster (`deploy/stack.sh cluster`, replication 3,
min.insync.replicas 2), one node SIGKILLed and restarted under load: the worker publishes replay's
handoffs, each once, and does not exit. Its own cluster on ports 18092-18097 (below the ephemeral
range: a client reconnecting to a dead node could self-connect and hold its port)."""
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import ROOT
from live import Env, publish, read, replay
from streams.tools.simulate import Simulator

PORT = 18092
BOOTSTRAP = ",".join(f"127.0.0.1:{PORT + 2 * i}" for i in range(3))


@pytest.fixture
def cluster():
    env = {**os.environ, "PQL_CLUSTER_PORT": str(PORT), "PQL_STACK_DIR": str(ROOT / ".stack" / "cluster-test"),
           "PQL_KAFKA_HEAP": "384m"}

    def stack(*args: str) -> None:
        res = subprocess.run([str(ROOT / "deploy/stack.sh"), "cluster", *args], env=env, capture_output=True,
                             text=True, timeout=180)
        assert res.returncode == 0, res.stderr

    stack("down")
    shutil.rmtree(ROOT / ".stack" / "cluster-test" / "cluster", ignore_errors=True)
    stack("up")
    try:
        yield stack
    finally:
        for n in "123":  # (its data goes next: no need to stop each node in order, ~9 s apiece)
            stack("kill", n)
        shutil.rmtree(ROOT / ".stack" / "cluster-test" / "cluster", ignore_errors=True)


def test_a_node_killed_and_restarted_under_load_loses_and_duplicates_nothing(cluster, redis_url, unique, tmp_path):
    env = Env(BOOTSTRAP, redis_url, unique, tmp_path)
    env.vars.update({"PQL_INSTANCE_ID": f"w{unique}", "PQL_ALERT_MAX_AGE": "0"})  # (PQL_REPLICATION unset: 3)
    lines = list(Simulator(accounts=300, seed=24, late_group=0.3).events(16_000))
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    want = sorted(json.loads(x)["id"] for x in replay(env, events) if '"pql.handoff"' in x)
    assert len(want) >= 20
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    admin.create_topics([NewTopic(env.topic("product.events"), 4, -1)])[env.topic("product.events")].result(30)
    try:
        worker = env.start_worker()
        env.wait_ready(worker, timeout=180)
        sender = threading.Thread(target=publish, args=(BOOTSTRAP, env.topic("product.events"), lines, 800))
        sender.start()
        time.sleep(5)
        # the node that coordinates the ingest tier's group (issue 24: its static member was fenced
        # when that node died, and the worker stalled), and leader of about a third of the partitions
        group = f"app{unique}-ingest"
        node = str(admin.describe_consumer_groups([group])[group].result(30).coordinator.id)
        cluster("kill", node)
        time.sleep(15)
        cluster("start", node)
        sender.join(120)
        got = read(BOOTSTRAP, [env.topic("pql.handoffs")], until=lambda m: len(m) >= len(want), idle=5,
                   timeout=180)
        ids = Counter(json.loads(m.value())["id"] for m in got)
        assert [i for i, n in ids.items() if n > 1] == []
        assert sorted(ids) == want
        assert worker.poll() is None, "the worker exited"
    finally:
        env.stop_all()
