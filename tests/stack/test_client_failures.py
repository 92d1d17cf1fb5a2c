"""No silent stall (issue 24): a fatal Kafka client error in the ingest tier (here its static member
fenced by another consumer with the same group.instance.id, as happens when a group's coordinator
moves) makes the consumer anew, and the worker goes on without a restart; were it to repeat, the
worker would stop with a non-zero exit (tests/unit/test_ingest.py)."""
import json
import time

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from live import ROOT, Env, publish, read


def _members(admin: AdminClient, group: str) -> list:
    try:
        d = admin.describe_consumer_groups([group])[group].result(timeout=15)
    except Exception:  # (not there yet)
        return []
    return [m.group_instance_id for m in d.members]


@pytest.mark.parametrize("own_process", [False, True])
def test_a_fenced_static_member_is_made_anew_and_the_worker_goes_on(kafka, redis_url, unique, tmp_path, own_process):
    env = Env(kafka, redis_url, unique, tmp_path)
    group, instance = f"app{unique}-ingest", f"w{unique}-ingest"
    env.vars.update({"PQL_INSTANCE_ID": f"w{unique}", "PQL_INGEST_PROCESS": str(own_process).lower()})
    try:
        worker = env.start_worker()
        env.wait_ready(worker)
        deadline, admin = time.time() + 60, AdminClient({"bootstrap.servers": kafka})
        while _members(admin, group) != [instance]:  # the ingest consumer has joined
            assert time.time() < deadline
            time.sleep(0.5)
        # another process joins the ingest group under the worker's static identity: the broker
        # hands it the membership, and the worker's consumer is fenced at its next heartbeat
        intruder = Consumer({"bootstrap.servers": kafka, "group.id": group, "group.instance.id": instance,
                             "session.timeout.ms": 10000,
                             "partition.assignment.strategy": "range"})  # (the group's protocol)
        intruder.subscribe([env.topic("product.events")])
        while not intruder.assignment():
            assert time.time() < deadline, "the intruder never got the membership"
            intruder.poll(0.2)
        intruder.close()
        while "making the consumer anew" not in open(worker.log_path).read():
            assert time.time() < deadline and worker.poll() is None, "the worker's consumer was not fenced"
            time.sleep(0.5)
        lines = (ROOT / "examples/first-events.jsonl").read_bytes().splitlines()
        publish(env.kafka, env.topic("product.events"), lines)
        got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= 1, timeout=90)
        assert [json.loads(m.value())["subject"] for m in got] == ["acme"]
        assert worker.poll() is None  # no exit, no restart
        assert "pql_kafka_clients_recreated_total 1.0" in env.metrics(worker)
    finally:
        env.stop_all()
