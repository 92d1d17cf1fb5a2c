"""Helpers for tests against the real stack: worker processes, publishing, reading topics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
PQL = [sys.executable, "-m", "streams.tools.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Env:
    """One isolated pipeline: its own app id, topic prefix and Redis prefix."""

    def __init__(self, kafka: str, redis_url: str, unique: str, tmp: Path, rules: Path | None = None,
                 partitions: int = 4):
        self.kafka, self.redis_url, self.unique, self.tmp = kafka, redis_url, unique, tmp
        self.prefix = f"t{unique}."
        self.vars = {
            "PQL_KAFKA_BOOTSTRAP": kafka, "PQL_REDIS_URL": redis_url, "PQL_REDIS_PREFIX": f"t{unique}:",
            "PQL_APP_ID": f"app{unique}", "PQL_TOPIC_PREFIX": self.prefix, "PQL_PARTITIONS": str(partitions),
            "PQL_RULES": str(rules or ROOT / "examples/rules.yaml"), "PQL_DATA_DIR": str(tmp / "data"),
            "PQL_LOG_LEVEL": "info",
        }
        self.workers: list[subprocess.Popen] = []

    def topic(self, name: str) -> str:
        return self.prefix + name

    def env(self, **extra) -> dict:
        return {**os.environ, **self.vars, **{k: str(v) for k, v in extra.items()}}

    def pql(self, *args, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([*PQL, *args], env=self.env(**extra), capture_output=True, text=True, cwd=ROOT,
                              timeout=120)

    def create_topic(self, name: str, partitions: int) -> None:
        admin = AdminClient({"bootstrap.servers": self.kafka})
        for f in admin.create_topics([NewTopic(self.topic(name), partitions, 1)]).values():
            f.result(timeout=30)

    def start_worker(self, name: str = "w", port: int | None = None, cwd: Path = ROOT, **extra) -> subprocess.Popen:
        """`port`: PQL_WEB_PORT (a free one by default; a worker restarted under the same
        PQL_INSTANCE_ID needs its old one: Faust's assignor checks the member's URL). `cwd`: the
        source tree it runs (another release's, for upgrade tests)."""
        log = open(self.tmp / f"{name}-{len(self.workers)}.log", "w")
        port = port or free_port()
        proc = subprocess.Popen([*PQL, "worker"], env=self.env(PQL_WEB_PORT=port, **extra), cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT)
        proc.web_port = port  # type: ignore[attr-defined]
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.workers.append(proc)
        return proc

    def wait_ready(self, *procs, timeout: float = 90) -> None:
        """Until each worker's /ready answers 200 (partitions assigned, tables recovered)."""
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        for proc in procs:
            while True:
                assert proc.poll() is None, f"worker exited; read {proc.log_path}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{proc.web_port}/ready", timeout=2):
                        break
                except (urllib.error.URLError, OSError):
                    assert time.time() < deadline, f"worker not ready in {timeout}s; read {proc.log_path}"
                    time.sleep(0.3)

    def metrics(self, proc) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{proc.web_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop_all(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def publish(kafka: str, topic: str, lines: list[bytes], rate: float | None = None) -> None:
    """Publish lines keyed like `pql publish` (by account when known)."""
    from streams.tools.simulate import key_of

    p = Producer({"bootstrap.servers": kafka, "linger.ms": 5, "enable.idempotence": True})
    started = time.perf_counter()
    for n, line in enumerate(lines, 1):
        p.produce(topic, line, key=key_of(line))
        if rate:
            ahead = n / rate - (time.perf_counter() - started)
            if ahead > 0:
                p.poll(0)
                time.sleep(ahead)
        if n % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0


def read(kafka: str, topics: list[str], until=lambda msgs: False, idle: float = 3.0, timeout: float = 90.0,
         committed: bool = True) -> list:
    """Read topics from the start (read_committed) until `until(msgs)` and `idle` quiet seconds, or timeout."""
    c = Consumer({"bootstrap.servers": kafka, "group.id": f"reader-{time.time_ns()}", "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed" if committed else "read_uncommitted",
                  "enable.auto.commit": False})
    c.subscribe(topics)
    msgs, deadline, quiet_since = [], time.time() + timeout, time.time()
    try:
        while time.time() < deadline:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                msgs.append(m)
                quiet_since = time.time()
            elif until(msgs) and time.time() - quiet_since >= idle:
                break
    finally:
        c.close()
    return msgs


def values(msgs) -> list[dict]:
    return [json.loads(m.value()) for m in msgs]


def replay(env: Env, events: Path, rules: Path | None = None, mql: Path | None = None,
           milestones: bool = False, now: str | None = None, responses: Path | None = None,
           switch: str | None = None) -> list[str]:
    args = ["replay", str(events), "--rules", str(rules or ROOT / "examples/rules.yaml")]
    if switch:
        args += ["--switch", switch]
    if now:
        args += ["--now", now]
    if mql:
        args += ["--mql", str(mql)]
    if responses:
        args += ["--responses", str(responses)]
    if milestones:  # everything the worker puts on pql.signals
        args += ["--milestones", "--stages"]
    res = env.pql(*args)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def eight_weeks(accounts: int = 300, count: int = 24_000, seed: int = 23) -> list[bytes]:
    """Eight weeks of simulated history that ended yesterday (more than the rules' lateness, so a
    backlog of it arrives far ahead of decisions still waiting); a third of the accounts act before
    their group call."""
    from datetime import datetime, timedelta, timezone

    from streams.tools.simulate import Simulator

    end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    sim = Simulator(accounts=accounts, seed=seed, start=end - timedelta(days=56), span_ms=56 * 86_400_000,
                    late_group=0.3)
    return list(sim.events(count))
