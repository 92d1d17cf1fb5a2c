"""Exactly one handoff per qualification: through SIGKILLs, a second worker, and Redis outages."""
import json
import random
import subprocess
import threading
import time
from collections import Counter

import pytest

from live import Env, free_port, kill9, publish, read, replay

RULES = """
version: "eo-1"
cooldown: 30d
milestones:
  crm:
    event: Integration Connected
    where: {properties.integration: {in: [salesforce, hubspot]}}
    points: 20
  invites:
    event: Invite Sent
    distinct: properties.invitee_email
    count: 2
    within: 7d
    points: 20
qualify: {score: 20, window: 30d}
"""


def stream(accounts: int, seed: int = 11) -> list[bytes]:
    """Every account qualifies once (CRM or invites), among noise and redeliveries.

    Accounts are staggered (account a starts at round a % 6), so qualifying events are spread
    over the whole stream and a kill at any moment can catch handoffs in flight. One account in
    three names no groupId on its events (published unkeyed): its user's group call comes after
    its first events, which are held until then, so kills also catch held events in flight.
    """
    rng = random.Random(seed)
    out, n = [], 0
    base = 1_795_000_000_000
    for rnd in range(12):
        for a in range(accounts):
            step = rnd - a % 6
            if not 0 <= step < 6:
                continue
            n += 1
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((base + n * 1000) / 1000)) + ".000Z"
            acct = f"eo-{a:05d}"
            if step == 3 and a % 2 == 0:
                doc = {"event": "Integration Connected", "properties": {"integration": "salesforce"}}
            elif step in (2, 4) and a % 2 == 1:
                doc = {"event": "Invite Sent", "properties": {"invitee_email": f"p{step}@{acct}.example"}}
            else:
                doc = {"event": rng.choice(["Feature Used", "Dashboard Viewed"]), "properties": {}}
            doc.update(type="track", messageId=f"{acct}-{step}", timestamp=ts, userId=f"{acct}-u",
                       context={"groupId": acct})
            if a % 3 == 0:
                del doc["context"]
            out.append(json.dumps(doc).encode())
            if a % 3 == 0 and step == 2:
                out.append(json.dumps({"type": "group", "groupId": acct, "userId": f"{acct}-u", "timestamp": ts,
                                       "messageId": f"{acct}-g", "traits": {}}).encode())
            if rng.random() < 0.02:
                out.append(out[-1])  # redelivery
    return out


@pytest.fixture
def eo(kafka, redis_url, unique, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    e = Env(kafka, redis_url, unique, tmp_path, rules=rules)
    e.rules = rules
    yield e
    e.stop_all()


def expected_handoffs(env, lines, tmp_path) -> list[str]:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    ids = [json.loads(x)["id"] for x in replay(env, events, rules=env.rules) if '"pql.handoff"' in x]
    assert len(ids) == len(set(ids)) > 0
    return ids


def handoff_counts(env, n_expected) -> Counter:
    msgs = read(env.kafka, [env.topic("pql.handoffs")], until=lambda m: len(m) >= n_expected, idle=4, timeout=180)
    return Counter(json.loads(m.value())["id"] for m in msgs)


@pytest.mark.parametrize("store,static", [("memory://", False), ("rocksdb://", True)])
def test_sigkill_at_random_instants_loses_and_duplicates_nothing(eo, tmp_path, store, static, unique):
    """Static: the worker comes back under its PQL_INSTANCE_ID (and web port), as in production
    (docs/configuration.md), and takes its partitions back without waiting out the dead member's
    session; dynamic: every restart rebalances."""
    lines = stream(accounts=1500)
    expected = expected_handoffs(eo, lines, tmp_path)
    eo.create_topic("product.events", 4)
    member = {"port": free_port(), "PQL_INSTANCE_ID": f"k{unique}"} if static else {}
    worker = eo.start_worker(PQL_STORE=store, **member)
    sender = threading.Thread(target=publish, args=(eo.kafka, eo.topic("product.events"), lines), kwargs={"rate": 400})
    sender.start()
    rng = random.Random(5)  # (400/s: ~23 s of sending; the loop goes on until 3 kills have hit a busy
    kills, busy_kills = 0, 0  # worker: a dynamic restart takes ~10 s, 4 of it waiting out the dead member)
    while sender.is_alive() or busy_kills < 3:
        if _wait_busy(eo, worker, timeout=30):  # kill while it is processing, at a random instant
            busy_kills += 1
        elif not sender.is_alive():  # nothing left to process: the assertion below says so
            break
        time.sleep(rng.uniform(0.1, 1.5))
        kill9(worker)
        kills += 1
        worker = eo.start_worker(PQL_STORE=store, **member)
    sender.join()
    counts = handoff_counts(eo, len(expected))
    written = read(eo.kafka, [eo.topic("pql.handoffs")], until=lambda m: True, idle=2, committed=False)
    print(f"{kills} SIGKILLs ({busy_kills} while processing); {len(expected)} handoffs expected; "
          f"{len(written)} handoff records written, {len(written) - sum(counts.values())} of them aborted")
    missing = [i for i in expected if counts[i] == 0]
    duplicated = {i: c for i, c in counts.items() if c > 1}
    assert not missing, f"{len(missing)} of {len(expected)} handoffs lost after {kills} SIGKILLs"
    assert not duplicated, f"duplicated handoffs after {kills} SIGKILLs: {list(duplicated.items())[:5]}"
    assert busy_kills >= 3, "most kills should hit a worker in the middle of its work"
    assert set(counts) == set(expected)
    if store == "memory://":  # the last restart read its changelogs in bulk (streams/worker/restore.py)
        eo.wait_ready(worker)  # it may still be starting: the handoffs were out before the last kill
        deadline = time.time() + 60
        while _metric(eo, worker, "pql_changelog_bulk_records_total") == 0 and time.time() < deadline:
            time.sleep(0.5)  # until the assignment that gives it partitions (the killed member times out)
        assert _metric(eo, worker, "pql_changelog_bulk_records_total") > 0


def test_two_workers_share_partitions_and_hand_over(eo, tmp_path):
    lines = stream(accounts=1200, seed=12)
    expected = expected_handoffs(eo, lines, tmp_path)
    eo.create_topic("product.events", 4)
    a, b = eo.start_worker("a"), eo.start_worker("b")
    eo.wait_ready(a, b)
    half = len(lines) // 2
    publish(eo.kafka, eo.topic("product.events"), lines[:half], rate=2000)
    time.sleep(8)
    # both workers did detection work before one of them leaves
    busy = [w for w in (a, b) if _handoffs_published(eo, w) > 0]
    assert len(busy) == 2, "both workers should own partitions with qualifying accounts"
    b.terminate()
    b.wait(60)
    publish(eo.kafka, eo.topic("product.events"), lines[half:], rate=2000)
    counts = handoff_counts(eo, len(expected))
    assert not [i for i in expected if counts[i] == 0], "handoffs lost in the handover"
    assert all(c == 1 for c in counts.values()), "handoffs duplicated in the handover"
    assert set(counts) == set(expected)


def _wait_busy(env, worker, timeout: float) -> bool:
    """Wait until this worker process has run detection on some events."""
    deadline = time.time() + timeout
    while time.time() < deadline and worker.poll() is None:
        try:
            if _metric(env, worker, "pql_event_processing_seconds_count") > 0:
                return True
        except OSError:
            pass  # web server not up yet
        time.sleep(0.2)
    return False


def _metric(env, worker, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in env.metrics(worker).splitlines() if ln.startswith(name))


def _handoffs_published(env, worker) -> float:
    total = 0.0
    for line in env.metrics(worker).splitlines():
        if line.startswith("pql_handoffs_published_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_redis_outage_delays_handoffs_and_loses_none(eo, tmp_path):
    """The worker's Redis stops mid-stream and comes back: every handoff still goes out, once."""
    from live import free_port

    port = free_port()
    rdir = tmp_path / "redis"
    rdir.mkdir()
    start = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(rdir)]
    server = subprocess.Popen(start, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    time.sleep(0.5)
    lines = stream(accounts=800, seed=13)
    expected = expected_handoffs(eo, lines, tmp_path)
    eo.create_topic("product.events", 4)
    worker = eo.start_worker(PQL_REDIS_URL=url, PQL_REDIS_RETRY_MAX=1)
    sender = threading.Thread(target=publish, args=(eo.kafka, eo.topic("product.events"), lines), kwargs={"rate": 400})
    sender.start()
    time.sleep(6)
    server.terminate()
    server.wait(10)
    time.sleep(6)  # events keep flowing while Redis is down
    assert worker.poll() is None, "the worker must not crash while Redis is down"
    server = subprocess.Popen(start, stdout=subprocess.DEVNULL)
    try:
        sender.join()
        counts = handoff_counts(eo, len(expected))
        errors = [ln for ln in eo.metrics(worker).splitlines() if ln.startswith("pql_redis_errors_total")]
    finally:
        server.terminate()
        server.wait(10)
    assert float(errors[0].split()[1]) > 0, "the outage should have been seen and counted"
    assert set(counts) == set(expected) and all(c == 1 for c in counts.values())
    assert "redis read failed" in open(worker.log_path).read()


