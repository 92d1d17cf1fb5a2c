"""The chaos run's moving parts: its own stack, the workers under a supervisor, the fault schedule."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy/stack.sh"


class Stack:
    """A Kafka and a Redis of the run's own (ports and directory apart from `make stack`'s). With
    `cluster`, Kafka is three KRaft nodes (`deploy/stack.sh cluster`) on kafka_port, +2, +4."""

    def __init__(self, kafka_port: int, redis_port: int, directory: Path, cluster: bool = False):
        self.env = {**os.environ, "PQL_KAFKA_PORT": str(kafka_port), "PQL_REDIS_PORT": str(redis_port),
                    "PQL_STACK_DIR": str(directory), "PQL_KAFKA_SASL_PORT": "", "PQL_CLUSTER_PORT": str(kafka_port),
                    "PQL_KAFKA_HEAP": "512m" if cluster else os.environ.get("PQL_KAFKA_HEAP", "1g")}
        self.cluster = cluster
        self.kafka = ",".join(f"127.0.0.1:{kafka_port + 2 * i}" for i in range(3 if cluster else 1))
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"

    def run(self, *command: str) -> None:
        out = subprocess.run([str(STACK), *command], env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"deploy/stack.sh {' '.join(command)} failed: {out.stderr.strip()}")

    def up(self) -> None:
        if self.cluster:
            shutil.rmtree(Path(self.env["PQL_STACK_DIR"]) / "cluster", ignore_errors=True)  # each run on a new cluster
            self.run("up-redis")
            self.run("cluster", "up")
        else:
            self.run("up")

    def in_sync(self, timeout: float = 180) -> float:
        """Wait until every partition's replicas are all in sync again (what an operator waits for
        between two nodes of a rolling restart: under-replicated partitions 0). Returns the seconds waited."""
        from confluent_kafka.admin import AdminClient

        admin, started = AdminClient({"bootstrap.servers": self.kafka}), time.time()
        while time.time() < started + timeout:
            try:
                topics = admin.list_topics(timeout=5).topics.values()
                if all(len(p.isrs) == len(p.replicas) for t in topics for p in t.partitions.values()):
                    return time.time() - started
            except Exception:  # a node still starting
                pass
            time.sleep(1)
        raise RuntimeError(f"partitions still under-replicated after {timeout:.0f} s")

    def down(self) -> None:
        if self.cluster:
            self.run("cluster", "down")
            self.run("down-redis")
        else:
            self.run("down")


@dataclass
class Life:
    slot: int
    pid: int
    started: float
    ended: float | None = None
    how: str = ""        # "sigkill" (ours), "exit N" (not ours), "stopped"
    why: str = ""        # an unexpected exit's last error line


class Workers:
    """`n` `pql worker` processes with one app id. `check()` restarts any that exited, as a supervisor
    would, and records exits we did not cause."""

    def __init__(self, n: int, env: dict, logdir: Path, web_port: int, static: bool = False, tree: Path = ROOT):
        """`tree`: the source tree the workers run (another release's, for `--upgrade-from`)."""
        self.env, self.logdir, self.web_port, self.static = env, logdir, web_port, static
        self.trees = [tree] * n
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.lives: list[Life] = []
        self.offsets: dict[int, int] = {}  # pid -> where its life starts in the slot's log
        self.lock = threading.Lock()

    def log_path(self, slot: int) -> Path:
        return self.logdir / f"worker-{slot}.log"

    def port(self, slot: int) -> int:
        return self.web_port + slot

    def start(self, slot: int) -> None:
        path = self.log_path(slot)
        with open(path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"], cwd=self.trees[slot],
                                    env={**self.env, "PQL_WEB_PORT": str(self.port(slot)),
                                         **({"PQL_INSTANCE_ID": f"worker-{slot}"} if self.static else {})},
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs[slot] = proc
        self.offsets[proc.pid] = offset
        self.lives.append(Life(slot, proc.pid, time.time()))

    def _ended(self, proc: subprocess.Popen, how: str) -> None:
        life = next(x for x in self.lives if x.pid == proc.pid)
        life.ended, life.how = time.time(), how
        if how.startswith("exit"):
            life.why = self._last_error(life)

    def _last_error(self, life: Life) -> str:
        with open(self.log_path(life.slot), "rb") as f:
            f.seek(self.offsets[life.pid])
            lines = f.read().decode(errors="replace").splitlines()
        raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]  # a traceback's last line
        return (raised or lines or [""])[-1][:300]

    def kill(self, slot: int) -> None:
        """SIGKILL the worker in `slot` and start a new one."""
        with self.lock:
            proc = self.procs[slot]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self._ended(proc, "sigkill")
            self.start(slot)

    def upgrade(self, slot: int, tree: Path = ROOT) -> None:
        """Stop the worker in `slot` (SIGTERM: it commits and leaves) and start it from `tree`."""
        with self.lock:
            proc = self.procs[slot]
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                self._ended(proc, "upgraded")
            self.trees[slot] = tree
            self.start(slot)

    def check(self) -> None:
        with self.lock:
            for slot, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    self._ended(proc, f"exit {proc.returncode}")
                    self.start(slot)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        with self.lock:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs:
                if proc is None:
                    continue
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if not any(x.pid == proc.pid and x.ended for x in self.lives):
                    self._ended(proc, "stopped")

    def unexpected(self) -> list[Life]:
        return [x for x in self.lives if x.how.startswith("exit")]


@dataclass
class Fault:
    kind: str            # sigkill, kafka_restart, redis_down, alerts_500, alerts_hang, node_kill, rolling_restart, upgrade
    at: float            # seconds after the stream starts
    length: float = 0.0  # seconds the fault lasts (0: an instant)
    slot: int = 0        # sigkill: which worker; node_kill: which cluster node
    started: float | None = None
    ended: float | None = None   # wall clock when the fault was over (service back, endpoint healthy)
    notes: list[str] = field(default_factory=list)


def schedule(seed: int, duration: float, workers: int = 2, cluster: bool = False, upgrade: bool = False) -> list[Fault]:
    """A SIGKILL every 10-30 s, one broker restart, Redis down 60 s, the alert endpoint failing
    (500s for 60 s) and hanging (120 s): drawn from `seed`. With `cluster`, instead of the broker
    restart: each of the three nodes SIGKILLed for 15 s in turn (its partitions' leaders, the group
    coordinators and the controller move), then a rolling restart of all three (stop, start, next)."""
    rng = random.Random(seed)
    faults = []
    t = rng.uniform(10, 30)
    while t < duration:
        faults.append(Fault("sigkill", t, slot=rng.randrange(workers)))
        t += rng.uniform(10, 30)
    if cluster:
        for node, at in zip(rng.sample([1, 2, 3], 3), (0.15, 0.32, 0.49)):
            faults.append(Fault("node_kill", (at + rng.uniform(0, 0.05)) * duration, 15, slot=node))
        faults.append(Fault("rolling_restart", rng.uniform(0.66, 0.72) * duration))
    else:
        faults.append(Fault("kafka_restart", rng.uniform(0.3, 0.45) * duration))
    faults.append(Fault("redis_down", rng.uniform(0.5, 0.6) * duration, 60))
    faults.append(Fault("alerts_500", rng.uniform(0.1, 0.25) * duration, 60))
    faults.append(Fault("alerts_hang", rng.uniform(0.6, 0.7) * duration, 120))
    if upgrade:  # a rolling upgrade: one worker, then the other, in the first half
        faults += [Fault("upgrade", rng.uniform(0.15, 0.2) * duration, slot=0),
                   Fault("upgrade", rng.uniform(0.25, 0.3) * duration, slot=1)]
    return sorted(faults, key=lambda f: f.at)


class Injector:
    """Runs the schedule from `t0` (wall clock), each fault in its own thread."""

    def __init__(self, faults: list[Fault], stack: Stack, workers: Workers, endpoint):
        self.faults, self.stack, self.workers, self.endpoint = faults, stack, workers, endpoint
        self.threads: list[threading.Thread] = []

    def start(self, t0: float) -> None:
        for f in self.faults:
            th = threading.Thread(target=self._run, args=(f, t0), daemon=True)
            th.start()
            self.threads.append(th)

    def done(self) -> bool:
        return not any(th.is_alive() for th in self.threads)

    def _run(self, f: Fault, t0: float) -> None:
        time.sleep(max(0.0, t0 + f.at - time.time()))
        f.started = time.time()
        try:
            getattr(self, f.kind)(f)
        except Exception as err:  # the run goes on; the report shows it
            f.notes.append(f"{type(err).__name__}: {err}")
        f.ended = time.time()

    def sigkill(self, f: Fault) -> None:
        self.workers.kill(f.slot)

    def upgrade(self, f: Fault) -> None:
        self.workers.upgrade(f.slot)

    def kafka_restart(self, f: Fault) -> None:
        self.stack.run("down-kafka")
        self.stack.run("up")

    def node_kill(self, f: Fault) -> None:
        """SIGKILL cluster node `f.slot`, start it again `f.length` later."""
        self.stack.run("cluster", "kill", str(f.slot))
        time.sleep(max(0.0, f.started + f.length - time.time()))
        self.stack.run("cluster", "start", str(f.slot))
        f.notes.append(f"in sync {self.stack.in_sync():.0f} s after the start")

    def rolling_restart(self, f: Fault) -> None:
        """Each node in turn stopped (SIGTERM) and started, the next once every partition is in sync
        again, as an operator does (under-replicated partitions 0). Moving on as soon as a node was up
        stopped the next one while partitions still caught up on the first: below min.insync.replicas
        they refuse writes (seed 1, session 11: NOT_ENOUGH_REPLICAS minutes later, the suspected
        cause of that run's stall)."""
        for node in (1, 2, 3):
            self.stack.run("cluster", "stop", str(node))
            self.stack.run("cluster", "start", str(node))
            f.notes.append(f"node {node} in sync {self.stack.in_sync():.0f} s after its start")

    def redis_down(self, f: Fault) -> None:
        self.stack.run("down-redis")
        time.sleep(max(0.0, f.started + f.length - time.time()))
        self.stack.run("up-redis" if self.stack.cluster else "up")

    def alerts_500(self, f: Fault) -> None:
        self.endpoint.mode = "500"
        time.sleep(f.length)
        self.endpoint.mode = "ok"

    def alerts_hang(self, f: Fault) -> None:
        self.endpoint.mode = "hang"
        time.sleep(f.length)
        self.endpoint.mode = "ok"
