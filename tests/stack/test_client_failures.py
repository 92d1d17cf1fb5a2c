"""No silent stall (issue 24): a fatal Kafka client error in the ingest tier (here a static member
fenced by another consumer with the same group.instance.id) stops the worker with a non-zero exit
and a clear log line, instead of leaving it alive without input; restarted, it recovers."""
import json
import time

import pytest
from confluent_kafka import Consumer

from live import ROOT, Env, publish, read


@pytest.mark.parametrize("own_process", [False, True])
def test_a_fenced_static_member_stops_the_worker_and_a_restart_recovers(kafka, redis_url, unique, tmp_path,
                                                                         own_process):
    env = Env(kafka, redis_url, unique, tmp_path)
    env.vars.update({"PQL_INSTANCE_ID": f"w{unique}", "PQL_INGEST_PROCESS": str(own_process).lower(),
                     "PQL_SESSION_TIMEOUT": "6"})
    try:
        worker = env.start_worker()
        env.wait_ready(worker)
        # another process joins the ingest group under the worker's static identity: the broker fences
        # whichever member joined first (the intruder too, if the worker's ingest consumer was still
        # joining: then it joins again)
        def intruder() -> Consumer:
            c = Consumer({"bootstrap.servers": kafka, "group.id": f"app{unique}-ingest",
                          "group.instance.id": f"w{unique}-ingest", "session.timeout.ms": 6000,
                          "partition.assignment.strategy": "cooperative-sticky"})  # (the group's protocol)
            c.subscribe([env.topic("product.events")])
            return c

        other, deadline = intruder(), time.time() + 90
        while worker.poll() is None and time.time() < deadline:
            m = other.poll(0.2)
            if m is not None and m.error() is not None and "fenced" in str(m.error()):
                other.close()
                other = intruder()
        assert worker.poll() is not None, "the fenced worker is still running (a silent stall)"
        assert worker.returncode != 0
        log = open(worker.log_path).read()
        assert "fatal Kafka client error" in log and "fenced" in log.lower()
        other.close()
        # a supervisor restarts it under the same identity: it takes its membership back and works
        restarted = env.start_worker(port=worker.web_port)  # (the same URL, as a static member must keep)
        env.wait_ready(restarted, timeout=120)
        lines = (ROOT / "examples/first-events.jsonl").read_bytes().splitlines()
        publish(env.kafka, env.topic("product.events"), lines)
        got = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= 1, timeout=90)
        assert [json.loads(m.value())["subject"] for m in got] == ["acme"]
    finally:
        env.stop_all()
