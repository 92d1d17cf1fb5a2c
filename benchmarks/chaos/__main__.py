"""The chaos run: two workers, a steady stream, a seeded fault schedule, checked against `pql replay`.

    python -m benchmarks.chaos [--seeds 1 2 3] [--rate 2000] [--duration 300] [--accounts 20000]

Starts its own Kafka and Redis (ports 49092 and 46379, directory .stack/chaos) so that it can restart
them; with `--cluster`, Kafka is three KRaft nodes on 19192, 19194, 19196 (deploy/stack.sh cluster;
below the ephemeral port range, where a client reconnecting to a dead node can self-connect and hold
its port), killed one at a time and restarted in a rolling restart. Per seed: generates the input (event times = planned send times), computes the expected
handoffs with `pql replay`, runs two workers while sending at `--rate` and injecting faults
(faults.schedule), answers handoffs like a rep (observe.Responder), then replays again with those
answers for the expected SLA breaches and stage events, and compares. Prints the table; each run's
directory (benchmarks/out/chaos<seed>-<time>/) keeps the input, the expected and seen events, the
worker logs and outcome.md (the table and the fault log). Exit status 0 when every run passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import Producer

from benchmarks.chaos import observe, report
from benchmarks.chaos.expect import replay, summary_count
from benchmarks.chaos.faults import ROOT, Injector, Stack, Workers, schedule
from detectors.timefmt import iso
from streams.produce import produce
from streams.tools.simulate import Simulator, key_of

SLA = 120            # seconds: the rules' pql SLA, so that unanswered handoffs breach within the run
ANSWER_AFTER = 10    # seconds after the qualifying event the rep answers
OUT = ROOT / "benchmarks/out"


def send(kafka: str, topic: str, lines: list[bytes], t0: float, rate: float) -> None:
    """Line k at wall clock t0 + k/rate (its event time), keyed by account when it names one."""
    p = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "linger.ms": 5,
                  "compression.type": "lz4", "queue.buffering.max.messages": 2_000_000})
    for k, line in enumerate(lines):
        if k % 50 == 0:
            ahead = t0 + k / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
            p.poll(0)
        produce(p, topic, line, key=key_of(line))
    if p.flush(600):
        raise RuntimeError("the sender could not deliver every event")


def run(stack: Stack, seed: int, a) -> report.Outcome:
    tag = f"chaos{seed}-{int(time.time())}"
    work = OUT / tag
    work.mkdir(parents=True)
    rules = work / "rules.yaml"
    tree = old_release(a, work)  # (its example rules: both releases must read them)
    text = re.sub(r"^sla: .*$", f"sla: {{pql: {SLA}s, mql: 24h}}", (tree / "examples/rules.yaml").read_text(), flags=re.M)
    rules.write_text(text + (f"settle: {a.settle}\n" if a.settle else ""))
    count = int(a.rate * a.duration)
    t0 = time.time() + 60  # the stream's first event time: after generation, replay and start-up
    sim = Simulator(accounts=a.accounts, seed=seed, start=datetime.fromtimestamp(t0, timezone.utc),
                    span_ms=int(a.duration * 1000))
    lines = list(sim.events(count))
    events = work / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    first, _ = replay(events, rules)
    handoffs = [i for i, (k, _, _) in first.items() if k == "pql.handoff"]
    print(f"seed {seed}: {count:,} events, {len(handoffs):,} handoffs expected; stream starts in "
          f"{t0 - time.time():.0f} s", flush=True)

    prefix = f"{tag}."
    env = {"PQL_KAFKA_BOOTSTRAP": stack.kafka, "PQL_REDIS_URL": stack.redis_url, "PQL_REDIS_PREFIX": f"{tag}:",
           "PQL_APP_ID": tag, "PQL_TOPIC_PREFIX": prefix, "PQL_RULES": str(rules), "PQL_STORE": a.store,
           "PQL_DATA_DIR": str(work / "data"), "PQL_LOG_LEVEL": "info", "PQL_WEBHOOK_SECRET": "chaos",
           "PQL_ALERT_RETRY_DELAY": "10"}
    endpoint = observe.Endpoint()
    env["PQL_WEBHOOK_URL"] = endpoint.url
    workers = Workers(2, {**os.environ, **env}, work, a.web_port, static=a.static, tree=tree)
    faults = schedule(seed, a.duration, cluster=a.cluster, upgrade=bool(a.upgrade_from))
    responder = observe.Responder(stack.kafka, prefix + "sales.responses", ANSWER_AFTER)
    obs = observe.Observer(stack.kafka, [prefix + "pql.handoffs", prefix + "pql.signals"],
                           prefix + "pql.events.dlq", responder.on_handoff)
    for slot in range(2):
        workers.start(slot)
    deadline = time.time() + 60
    while not all(observe.ready(workers.port(s)) for s in range(2)):
        if time.time() > deadline:
            raise RuntimeError(f"workers did not start; read {work}/worker-*.log")
        time.sleep(0.5)
    obs.start()
    responder.start()
    sender = threading.Thread(target=send, args=(stack.kafka, prefix + "product.events", lines, t0, a.rate))
    sender.start()
    Injector(faults, stack, workers, endpoint).start(t0)
    rss = watch(workers, obs, faults, handoffs, sender, t0, a)
    workers.stop()
    obs.running = responder.running = False
    responder.join()
    endpoint.close()

    answers = work / "responses.jsonl"
    responder.write(answers)
    obs.write(work / "seen.jsonl")
    later = iso(int((t0 + a.duration + 86_400) * 1000))
    expected, summary = replay(events, rules, "--responses", str(answers), "--now", later, save=work / "expected.jsonl")
    return outcome(seed, a, expected, summary, obs, endpoint, workers, faults, rss, count, work)


def watch(workers: Workers, obs, faults, handoffs: list[str], sender, t0: float, a) -> list[tuple]:
    """Supervise until the stream and the faults are over and every expected handoff and breach is
    out (or `a.wait` seconds after the last clock is due). Returns (wall, pid, MiB) samples."""
    rss, end = [], t0 + a.duration + SLA + ANSWER_AFTER
    while True:
        workers.check()
        now = time.time()
        for pid in workers.pids():
            mib = observe.rss_mib(pid)
            if mib:
                rss.append((now, pid, mib))
        faults_over = all(f.ended for f in faults)
        if not sender.is_alive() and faults_over and now > end:
            unanswered = [h for h in handoffs if observe.answers(h) is None]
            if all(h in obs.first for h in handoffs) and len(obs.ids("pql.sla_breached")) >= len(unanswered):
                break
            if now > end + a.wait:
                break
        time.sleep(1)
    time.sleep(5)  # stragglers: duplicates would show now
    return rss


def outcome(seed, a, expected, summary, obs, endpoint, workers, faults, rss, count, work) -> report.Outcome:
    kinds = {i: k for i, (k, _, _) in expected.items()}
    o = report.Outcome(seed, count, a.rate, a.duration)
    o.faults = Counter(f.kind for f in faults if f.started)
    o.rows = report.compare(kinds, obs)
    alerted = {i: t for i, (k, t, _) in expected.items() if k in ("pql.handoff", "pql.sla_breached")}
    o.alerts = (len(alerted), len(alerted.keys() & endpoint.delivered.keys()))
    rejects = summary_count(summary, "events read", r"[\d,]+ \([\d,]+ valid, ([\d,]+) invalid") + \
        summary_count(summary, "too late", r"([\d,]+)")
    o.dlq = (rejects, len(obs.dlq), obs.dlq_records)
    outputs = {i: t for i, (k, t, _) in expected.items() if k in ("pql.handoff", "pql.sla_breached")}
    o.divergent = report.divergent({i: (k, a) for i, (k, _, a) in expected.items()}, obs)
    detect_faults = [f for f in faults if not f.kind.startswith("alerts")]
    o.recovery = report.recovery(detect_faults, outputs, obs.first)
    alert_faults = [f for f in faults if f.kind.startswith("alerts")]
    o.recovery.update(report.recovery(alert_faults, alerted, endpoint.delivered))
    o.alert_delays = report.alert_delays(alert_faults, endpoint.delivered,
                                         {i: t for i, t in obs.first.items() if i in alerted})
    last = max(f.ended for f in detect_faults if f.ended)
    o.caught_up = report.late_after(last, outputs, obs.first)
    o.exits = [f"worker {x.slot} pid {x.pid}: {x.how}: {x.why}" for x in workers.unexpected()]
    start, stop = rss[0][0] if rss else 0, rss[-1][0] if rss else 0
    o.rss = (max((m for t, _, m in rss if t < start + 60), default=0),
             max((m for t, _, m in rss if t > stop - 60), default=0), max((m for _, _, m in rss), default=0))
    o.notes = [f"{f.kind} at +{f.at:.0f}s" + (f" (worker {f.slot})" if f.kind in ("sigkill", "upgrade") else "")
               + (f": took {f.ended - f.started:.1f}s" if f.ended and f.started else "")
               + (f" {'; '.join(f.notes)}" if f.notes else "") for f in faults]
    (work / "outcome.md").write_text(report.table([o]) + "\n" + "\n".join(o.notes + o.exits) + "\n")
    (work / "faults.json").write_text(json.dumps([vars(f) for f in faults]))
    (work / "alerts.json").write_text(json.dumps(endpoint.delivered))
    return o


def old_release(a, work: Path) -> Path:
    """The tree the workers start from: this one, or with --upgrade-from that commit's (git archive)."""
    if not a.upgrade_from:
        return ROOT
    tree = work / "old-release"
    tree.mkdir()
    subprocess.run(f"git archive {a.upgrade_from} | tar -x -C {tree}", shell=True, cwd=ROOT, check=True)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--accounts", type=int, default=20_000)
    ap.add_argument("--store", default="memory://")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for stragglers after the end")
    ap.add_argument("--kafka-port", type=int, default=49092)
    ap.add_argument("--redis-port", type=int, default=46379)
    ap.add_argument("--web-port", type=int, default=46066)
    ap.add_argument("--keep-stack", action="store_true")
    ap.add_argument("--settle", help="the rules' settle (e.g. 2s; default: the example rules', 0s)")
    ap.add_argument("--static", action="store_true", help="workers keep PQL_INSTANCE_ID across restarts (static membership)")
    ap.add_argument("--cluster", action="store_true",
                    help="Kafka as three KRaft nodes (replication 3, min ISR 2): nodes killed in turn and a rolling "
                         "restart instead of the broker restart")
    ap.add_argument("--upgrade-from", metavar="COMMIT",
                    help="start both workers from that release (git archive) and upgrade them to this one, one at a "
                         "time (SIGTERM, start), in the first half of the run: a rolling upgrade under the faults")
    a = ap.parse_args()
    port = 19192 if a.cluster and a.kafka_port == 49092 else a.kafka_port  # (see the docstring)
    stack = Stack(port, a.redis_port, ROOT / ".stack/chaos", cluster=a.cluster)
    stack.up()
    runs = []
    try:
        for seed in a.seeds:
            runs.append(run(stack, seed, a))
            print(report.table(runs[-1:]), flush=True)
    finally:
        if not a.keep_stack:
            stack.down()
    print(report.table(runs))
    sys.exit(0 if all(r.ok() for r in runs) else 1)


if __name__ == "__main__":
    main()
