"""`make demo`: the worker on simulated product traffic, with handoffs shown as they happen.

Uses the stack from `make stack` (or PQL_KAFKA_BOOTSTRAP / PQL_REDIS_URL). Each run gets fresh
topics (prefix demo-<time>.) so what you see is this run's. PQL_DEMO_SECONDS (default 60) sets how
long traffic flows; PQL_DEMO_RATE (default 300) the events per second. PQL_DEMO_PROMETHEUS=1 also
runs a local Prometheus (Debian package, installed when missing) on 127.0.0.1:9090 with our alert rules.

The sales side is simulated too: the example rules run with a 15 s SLA, a local endpoint stands in
for Slack, and a simulated sales team accepts, rejects or ignores each handoff (ignored ones breach).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from detectors.timefmt import parse_ms
from streams.config import ROOT, load_settings
from streams.mqlstore import MqlStore
from schemas.mql import MqlRecord
from schemas.rules import load_rules


SLA = 15  # seconds, for the demo only (the example rules say 1h)
REASONS = ["not_icp", "no_budget", "bad_timing", "student_or_research", "competitor"]


class SlackStandIn:
    """A local endpoint that takes Slack-format alerts and counts them."""

    def __init__(self):
        self.received = Counter()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                received[self.headers.get("X-PQL-Event-Type", "?")] += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slack"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def demo_rules(run: str, source) -> str:
    """The example rules with a short SLA, so breaches show within the demo."""
    text = re.sub(r"(?m)^sla:.*$", f"sla: {{pql: {SLA}s, mql: 24h}}", open(source).read())
    path = ROOT / ".stack" / f"{run}-rules.yaml"
    path.write_text(text)
    return str(path)


def main() -> None:
    seconds = float(os.environ.get("PQL_DEMO_SECONDS", "60"))
    rate = float(os.environ.get("PQL_DEMO_RATE", "300"))
    run = f"demo-{int(time.time())}"
    (ROOT / ".stack").mkdir(exist_ok=True)
    slack = SlackStandIn()
    env = {**os.environ, "PQL_TOPIC_PREFIX": f"{run}.", "PQL_APP_ID": run, "PQL_REDIS_PREFIX": f"{run}:",
           "PQL_LOG_LEVEL": "warn", "PQL_SLACK_WEBHOOK_URL": slack.url,
           "PQL_RULES": demo_rules(run, load_settings().rules)}
    os.environ.update({k: env[k] for k in ("PQL_TOPIC_PREFIX", "PQL_APP_ID", "PQL_REDIS_PREFIX", "PQL_RULES")})
    s = load_settings()
    rules = load_rules(s.rules)
    describe = {mid: m.description or mid for mid, m in rules.milestones.items()}

    # The CRM already knows some accounts: MQLs with owners, and a few already in sales.
    store = MqlStore(s.redis_url, s.redis_prefix)
    stages = ["MQL", "SAL", "SQL", "Recycled", "Customer"]
    for i in range(0, 400, 3):
        store.put(MqlRecord(account_id=f"acct-{i:06d}", stage=stages[i % 5], owner=f"rep-{i % 6 + 1}"))

    log = open(ROOT / ".stack" / f"{run}-worker.log", "w")
    print(f"pql demo {run}: rules {rules.version} (SLA shortened to {SLA}s) ; worker log {log.name}")
    worker = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    prom = _prometheus(run, s.web_port) if os.environ.get("PQL_DEMO_PROMETHEUS") == "1" else None
    try:
        _watch(s, run, seconds, rate, describe, env, worker, slack)
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


class SalesTeam:
    """Answers handoffs like a busy team: most are accepted, some rejected, some left to breach."""

    def __init__(self, s, seed: int):
        from confluent_kafka import Producer

        self.topic = s.topic("sales.responses")
        self.producer = Producer({**s.confluent(), "enable.idempotence": True, "linger.ms": 5})
        self.rng = random.Random(seed)
        self.todo: list[tuple[float, dict]] = []

    def handed_off(self, ev: dict) -> None:
        roll, at = self.rng.random(), time.time() + self.rng.uniform(2, SLA - 3)
        base = {"handoff_id": ev["id"], "account_id": ev["subject"], "by": f"rep-{self.rng.randint(1, 6)}"}
        if roll < 0.5:
            self.todo.append((at, {**base, "status": "accepted"}))
            if self.rng.random() < 0.3:
                self.todo.append((at + self.rng.uniform(3, 10), {**base, "status": "converted"}))
        elif roll < 0.7:
            self.todo.append((at, {**base, "status": "rejected", "reason": self.rng.choice(REASONS)}))
        # else: nobody answers; the SLA clock runs out

    def send_due(self) -> None:
        now = time.time()
        for at, doc in [x for x in self.todo if x[0] <= now]:
            self.todo.remove((at, doc))
            doc = {**doc, "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
            self.producer.produce(self.topic, json.dumps(doc).encode(), key=doc["account_id"].encode())
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(10)


class Tally:
    """What the demo shows: each handoff and sales stage as it comes, and the counts for the summary."""

    def __init__(self, describe: dict[str, str], team: SalesTeam):
        self.describe, self.team = describe, team
        self.handoffs, self.suppressed, self.milestones, self.latency = 0, Counter(), Counter(), []
        self.stages, self.accept_s = Counter(), []

    def show(self, ev: dict) -> None:
        d = ev["data"]
        if ev["type"] == "pql.handoff":
            self.handoffs += 1
            self.team.handed_off(ev)
            latency = time.time() - parse_ms(ev["time"]) / 1000
            self.latency.append(latency)
            name = (d.get("account_name") or "")[:12]
            print(f"{ev['time'][11:19]}  {name + ' ' + d['account_id'][-6:]:22} {str(d['owner'] or '-'):7} "
                  f"{d['precedence']:19} {d['sla_due_at'][11:19]}  {latency * 1000:5.0f}ms  "
                  + "; ".join(self.describe.get(x, x) for x in d["milestones"]), flush=True)
        elif ev["type"] in ("pql.stage", "pql.sla_breached") and d["stage"] not in ("qualified", "handed_off"):
            self.stages[d["stage"]] += 1
            if d["stage"] == "accepted":
                self.accept_s.append(d["seconds_since_handoff"])
            what = {"accepted": f"accepted by {d['by']} after {d['seconds_since_handoff']:.0f}s",
                    "rejected": f"rejected by {d['by']}: {d['reason']}",
                    "converted": f"converted ({d['by']})",
                    "sla_breached": f"SLA BREACHED: no answer by {d['sla_due_at'][11:19]}"}[d["stage"]]
            print(f"{d['at'][11:19]}    {d['account_id'][-6:]:>6} {what}", flush=True)
        elif ev["type"] == "pql.suppressed":
            self.suppressed[d["reason"]] += 1
        elif ev["type"] == "pql.milestone":
            self.milestones[d["milestone"]] += 1

    def summary(self, s, slack: SlackStandIn) -> None:
        stages = self.stages
        print(f"\nsummary: {self.handoffs} handoffs, suppressed {dict(self.suppressed) or 'none'}, "
              f"milestones {dict(self.milestones)}")
        print(f"sales: {stages['accepted']} accepted, {stages['rejected']} rejected, {stages['converted']} converted, "
              f"{stages['sla_breached']} SLA breaches"
              + (f"; median time to accept {statistics.median(self.accept_s):.1f}s" if self.accept_s else ""))
        print(f"alerts delivered to the local Slack stand-in: {slack.received['pql.handoff']} handoffs, "
              f"{slack.received['pql.sla_breached']} breaches")
        if self.latency:
            lat = self.latency
            q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
            print(f"event-to-handoff latency: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms")
        print(f"topics: {s.topic('pql.handoffs')}, {s.topic('pql.signals')}, {s.topic('pql.events.dlq')}")
        print("metrics were served at /metrics on the worker's web port while it ran (PQL_WEB_PORT); "
              "the next step is `make stack-down`")


def _watch(s, run, seconds, rate, describe, env, worker, slack) -> None:
    from confluent_kafka import Consumer

    time.sleep(3)
    if worker.poll() is not None:
        sys.exit(f"the worker exited at start-up (code {worker.returncode}); read .stack/{run}-worker.log")
    sim = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "simulate", "--accounts", "400", "--now",
                            "--rate", str(rate), "--events", str(int(rate * seconds)), "--seed", str(int(time.time()))],
                           env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    team = SalesTeam(s, int(time.time()))
    c = Consumer({**s.confluent(), "group.id": f"{run}-viewer", "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed"})
    c.subscribe([s.topic("pql.handoffs"), s.topic("pql.signals")])
    print(f"traffic: ~{rate:.0f} events/s for {seconds:.0f}s from 400 simulated accounts; metrics at "
          f"http://{s.web_host}:{s.web_port}/metrics\n")
    print(f"{'time':8}  {'account':22} {'owner':7} {'precedence':19} {'SLA due':8}  {'latency':>7}  milestones")
    tally = Tally(describe, team)
    deadline = time.time() + seconds + SLA + 6
    while time.time() < deadline:
        team.send_due()
        m = c.poll(0.3)
        if m is not None and m.error() is None:
            tally.show(json.loads(m.value()))
    c.close()
    team.close()
    sim.wait(30)
    tally.summary(s, slack)


if __name__ == "__main__":
    main()
