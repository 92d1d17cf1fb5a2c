"""`make demo`: the worker on simulated product traffic, with handoffs shown as they happen.

Uses the stack from `make stack` (or PQL_KAFKA_BOOTSTRAP / PQL_REDIS_URL). Each run gets fresh
topics (prefix demo-<time>.) so what you see is this run's. PQL_DEMO_SECONDS (default 60) sets how
long traffic flows; PQL_DEMO_RATE (default 300) the events per second. PQL_DEMO_PROMETHEUS=1 also
runs a local Prometheus (Debian package, installed when missing) on 127.0.0.1:9090 with our alert rules.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from streams.config import ROOT, load_settings
from streams.mqlstore import MqlStore
from schemas.mql import MqlRecord
from schemas.rules import load_rules


def _parse_time(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> None:
    seconds = float(os.environ.get("PQL_DEMO_SECONDS", "60"))
    rate = float(os.environ.get("PQL_DEMO_RATE", "300"))
    run = f"demo-{int(time.time())}"
    env = {**os.environ, "PQL_TOPIC_PREFIX": f"{run}.", "PQL_APP_ID": run, "PQL_REDIS_PREFIX": f"{run}:",
           "PQL_LOG_LEVEL": "warn"}
    os.environ.update({k: env[k] for k in ("PQL_TOPIC_PREFIX", "PQL_APP_ID", "PQL_REDIS_PREFIX")})
    s = load_settings()
    rules = load_rules(s.rules)
    describe = {mid: m.description or mid for mid, m in rules.milestones.items()}

    # The CRM already knows some accounts: MQLs with owners, and a few already in sales.
    store = MqlStore(s.redis_url, s.redis_prefix)
    stages = ["MQL", "SAL", "SQL", "Recycled", "Customer"]
    for i in range(0, 400, 3):
        store.put(MqlRecord(account_id=f"acct-{i:06d}", stage=stages[i % 5], owner=f"rep-{i % 6 + 1}"))

    log = open(ROOT / ".stack" / f"{run}-worker.log", "w")
    print(f"pql demo {run}: rules {rules.version} from {s.rules}; worker log {log.name}")
    worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    prom = _prometheus(run, s.web_port) if os.environ.get("PQL_DEMO_PROMETHEUS") == "1" else None
    try:
        _watch(s, run, seconds, rate, describe, env, worker)
        if prom is not None:
            print("Prometheus: http://127.0.0.1:9090 (try pql_handoffs_published_total); it stops with the demo")
    finally:
        if prom is not None:
            prom.terminate()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


def _prometheus(run: str, web_port: int):
    subprocess.run([str(ROOT / "deploy/stack.sh"), "tools"], check=True)
    cfg = ROOT / ".stack" / f"{run}-prometheus.yml"
    cfg.write_text((ROOT / "deploy/prometheus/local.yml").read_text()
                   .replace("127.0.0.1:6066", f"127.0.0.1:{web_port}")
                   .replace("  - alerts.yml", f"  - {ROOT / 'deploy/prometheus/alerts.yml'}"))
    return subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={ROOT / '.stack' / 'prometheus'}",
                             "--web.listen-address=127.0.0.1:9090"], stdout=subprocess.DEVNULL,
                            stderr=open(ROOT / ".stack" / f"{run}-prometheus.log", "w"))


def _watch(s, run, seconds, rate, describe, env, worker) -> None:
    from confluent_kafka import Consumer

    time.sleep(3)
    if worker.poll() is not None:
        sys.exit(f"the worker exited at start-up (code {worker.returncode}); read .stack/{run}-worker.log")
    sim = subprocess.Popen([sys.executable, "-m", "streams.cli", "simulate", "--accounts", "400", "--now",
                            "--rate", str(rate), "--events", str(int(rate * seconds)), "--seed", str(int(time.time()))],
                           env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    c = Consumer({**s.confluent(), "group.id": f"{run}-viewer", "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed"})
    c.subscribe([s.topic("pql.handoffs"), s.topic("pql.signals")])
    print(f"traffic: ~{rate:.0f} events/s for {seconds:.0f}s from 400 simulated accounts; metrics at "
          f"http://{s.web_host}:{s.web_port}/metrics\n")
    print(f"{'time':8}  {'account':22} {'owner':7} {'precedence':19} {'SLA due':8}  {'latency':>7}  milestones")
    handoffs, suppressed, milestones, lat = 0, Counter(), Counter(), []
    deadline = time.time() + seconds + 8
    while time.time() < deadline:
        m = c.poll(0.3)
        if m is None or m.error() is not None:
            continue
        ev = json.loads(m.value())
        d = ev["data"]
        if ev["type"] == "pql.handoff":
            handoffs += 1
            latency = time.time() - _parse_time(ev["time"])
            lat.append(latency)
            name = (d.get("account_name") or "")[:12]
            print(f"{ev['time'][11:19]}  {name + ' ' + d['account_id'][-6:]:22} {str(d['owner'] or '-'):7} "
                  f"{d['precedence']:19} {d['sla_due_at'][11:19]}  {latency * 1000:5.0f}ms  "
                  + "; ".join(describe.get(x, x) for x in d["milestones"]), flush=True)
        elif ev["type"] == "pql.suppressed":
            suppressed[d["reason"]] += 1
        elif ev["type"] == "pql.milestone":
            milestones[d["milestone"]] += 1
    c.close()
    sim.wait(30)
    print(f"\nsummary: {handoffs} handoffs, suppressed {dict(suppressed) or 'none'}, milestones {dict(milestones)}")
    if lat:
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        print(f"event-to-handoff latency: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")
    print(f"topics: {s.topic('pql.handoffs')}, {s.topic('pql.signals')}, {s.topic('pql.events.dlq')}")
    print("metrics were served at /metrics on the worker's web port while it ran (PQL_WEB_PORT); "
          "the next step is `make stack-down`")


if __name__ == "__main__":
    main()
