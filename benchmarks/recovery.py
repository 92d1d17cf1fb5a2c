"""Table recovery after a SIGKILL, measured on a stack of its own (ports 48092 and 48379, .stack/recovery).

    python -m benchmarks.recovery [--seed 2] [--rate 2000] [--duration 120] [--kills 40 80 120]

One worker (static membership, as in `make chaos`) reads a steady stream from the chaos generator
(seed 2 has the Pareto-hot account whose ~450 KB state is rewritten by every envelope it is in). It
is SIGKILLed at each --kills second and restarted at once. Per restart: the changelogs it read
(records, MiB on disk), seconds from the kill to the end of the bulk read (streams/worker/restore.py),
to Faust's 'Restoring state' and 'Done reading' (absent when the bulk read left it nothing), to
'Worker ready', and to caught up (the ingest group has committed what product.events held 0.5 s before, and
the worker reports no lag on <app>-accounts; that gauge is updated every 5 s, so this one is coarse).
"""
from __future__ import annotations

import argparse
import os
import re
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from benchmarks.chaos.__main__ import send
from benchmarks.chaos.faults import ROOT, Stack, Workers
from streams.tools.simulate import Simulator

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
MARKS = {"bulk": "bulk changelog read", "restoring": "Restoring state from changelog topics",
         "read": "Done reading from changelog topics", "ready": "Worker ready"}


def stamps(log: Path, offset: int) -> dict[str, float]:
    """Wall clock of the first line of each MARKS phrase after `offset` in the worker's log."""
    found: dict[str, float] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for raw in f:
            line = raw.decode(errors="replace")
            for mark, phrase in MARKS.items():
                m = STAMP.match(line)
                if mark not in found and phrase in line and m:
                    local = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    found[mark] = local.replace(tzinfo=datetime.now().astimezone().tzinfo).timestamp()
    return found


def changelogs(kafka: str, app: str, directory: Path) -> tuple[int, float]:
    """(records, MiB on disk) of the worker's changelog topics now."""
    c = Consumer({"bootstrap.servers": kafka, "group.id": f"rec-{time.time_ns()}"})
    records = 0
    for table in ("accounts", "users", "clocks"):
        topic = f"{app}-{table}-changelog"
        for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            records += high - low
    c.close()
    size = sum(f.stat().st_size for f in directory.glob(f"kafka/data/{app}-*-changelog-*/*.log"))
    return records, size / 2**20


def ingest_offsets(kafka: str, prefix: str, app: str) -> tuple[dict, dict]:
    """(committed offset of the ingest group, high watermark) per product.events partition."""
    c = Consumer({"bootstrap.servers": kafka, "group.id": f"{app}-ingest"})
    try:
        topic = prefix + "product.events"
        parts = [TopicPartition(topic, p) for p in c.list_topics(topic, timeout=5).topics[topic].partitions]
        committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=5)}
        return committed, {tp.partition: c.get_watermark_offsets(tp, timeout=5)[1] for tp in parts}
    finally:
        c.close()


def accounts_lag_ok(port: int, prefix: str, app: str) -> bool:
    """The worker reports at most 2 offsets of lag on each <app>-accounts partition (its end is a
    commit marker, and ticks keep coming)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return False
    lags = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln.startswith("pql_consumer_lag{") and f'topic="{prefix}{app}-accounts"' in ln]
    return bool(lags) and max(lags) <= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--accounts", type=int, default=20_000)
    ap.add_argument("--kills", type=float, nargs="+", default=[40, 80, 120])
    a = ap.parse_args()

    directory = ROOT / ".stack/recovery"
    stack = Stack(48092, 48379, directory)
    stack.up()
    tag = f"rec{a.seed}-{int(time.time())}"
    work = ROOT / "benchmarks/out" / tag
    work.mkdir(parents=True)
    prefix = f"{tag}."
    env = {**os.environ, "PQL_KAFKA_BOOTSTRAP": stack.kafka, "PQL_REDIS_URL": stack.redis_url,
           "PQL_REDIS_PREFIX": f"{tag}:", "PQL_APP_ID": tag, "PQL_TOPIC_PREFIX": prefix,
           "PQL_RULES": str(ROOT / "examples/rules.yaml"), "PQL_DATA_DIR": str(work / "data"), "PQL_LOG_LEVEL": "info"}
    workers = Workers(1, env, work, 48066, static=True)
    workers.start(0)
    t0 = time.time() + 20
    sim = Simulator(accounts=a.accounts, seed=a.seed, start=datetime.fromtimestamp(t0, timezone.utc),
                    span_ms=int(a.duration * 1000))
    lines = list(sim.events(int(a.rate * a.duration)))
    sender = threading.Thread(target=send, args=(stack.kafka, prefix + "product.events", lines, t0, a.rate))
    sender.start()
    print(f"{len(lines):,} events at {a.rate:,.0f}/s from {datetime.fromtimestamp(t0):%H:%M:%S}; kills at "
          f"{', '.join(f'+{k:.0f}s' for k in a.kills)}; logs in {work}", flush=True)
    print("| kill | changelog records / MiB | to bulk read done s | to Faust restoring s | to Faust done s "
          "| to ready s | to caught up s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    try:
        for k in a.kills:
            time.sleep(max(0.0, t0 + k - time.time()))
            records, mib = changelogs(stack.kafka, tag, directory)
            killed = time.time()
            workers.kill(0)
            offset = workers.offsets[workers.pids()[0]]
            caught, before = None, None
            while time.time() < killed + 300:
                # caught up: the ingest tier has committed what was in product.events 0.5 s ago,
                # and `detect` is at the end of <app>-accounts
                try:
                    committed, high = ingest_offsets(stack.kafka, prefix, tag)
                except Exception:  # a broker call timed out
                    committed, high = {}, None
                ready = "ready" in stamps(workers.log_path(0), offset)
                if ready and before and all(committed.get(p, -1) >= h for p, h in before.items()) \
                        and accounts_lag_ok(workers.port(0), prefix, tag):
                    caught = time.time()
                    break
                before = high
                time.sleep(0.5)
            marks = stamps(workers.log_path(0), offset)
            cell = [f"{marks[m] - killed:.1f}" if m in marks else "-" for m in MARKS]
            print(f"| +{k:.0f}s | {records:,} / {mib:,.0f} | {' | '.join(cell)} | "
                  f"{caught - killed if caught else float('nan'):.1f} |", flush=True)
    finally:
        sender.join()
        workers.stop()
        stack.down()


if __name__ == "__main__":
    main()
