"""Scale-out: what the partition count costs one worker, and what a second worker adds (issue 25).

For each PQL_PARTITIONS in --partitions (4, 16, 64, 256), back to back against the local Kafka
(`make stack`), each run on its own topics:
- throughput: one worker over a backlog of --events events (product.events: 4 partitions, as in
  benchmarks/stream_bench.py), from its first consumed event until every output is readable, with
  the handoff ids checked against `pql replay`; the raw client (confluent-kafka + json.loads) on the
  same topic in the same run, as the ceiling;
- idle CPU: a ready worker with no input, CPU time over --idle-seconds read from /proc (the worker and
  its children), as % of a core;
- latency: p99 event -> handoff readable at --rate events/s (benchmarks/stream_bench.latency);
then one worker vs two sharing --pair partitions (throughput on the same backlog).

    python -m benchmarks.scaling [--partitions 4 16 64 256] [--events 200000] [--accounts 20000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import time
import urllib.request
from pathlib import Path

from benchmarks import stream_bench as sb
from detectors.engine import Engine
from schemas.rules import load_rules
from streams.config import Settings, alert_max_age_ms
from streams.tools.replay import replay
from streams.tools.simulate import Simulator

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its children (the ingest process), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / ticks
    except OSError:
        return 0.0
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            total += sum(cpu_seconds(int(c)) for c in task.read_text().split())
        except OSError:
            pass
    return total


def start(prefix: str, port: int, **extra: str):
    """A `pql worker` on the bench topics, its log in benchmarks/out/<prefix><port>.log."""
    import subprocess
    import sys

    log = open(ROOT / "benchmarks" / "out" / f"{prefix}{port}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"],
                            env={**sb.worker_env(prefix, port), **extra}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def expected_outputs(lines: list[bytes]) -> tuple[int, list[str]]:
    out = io.StringIO()
    now = int(time.time() * 1000)
    engine = Engine(load_rules(ROOT / "examples/rules.yaml"), alert_max_age_ms(Settings().alert_max_age))
    replay(lines, engine, {}, out, io.StringIO(), milestones=True, stages=True, now=now, processed_at=now)
    got = out.getvalue().splitlines()
    return len(got), sorted(json.loads(x)["id"] for x in got if '"pql.handoff"' in x)


def throughput(partitions: int, lines: list[bytes], expected: int, want: list[str], workers: int = 1) -> tuple[float, float, bool]:
    """(events/s of the worker(s), events/s of the raw client, handoff ids == replay's). The rate is
    0 when the outputs did not all come (the drain went quiet for 60 s short of them): a run that
    stalls has no throughput (at 256 partitions one gave "198 million events/s" from no output)."""
    prefix = f"scale{partitions}w{workers}t{int(time.time())}."
    topic = prefix + "product.events"
    sb.backlog(topic, lines)
    n = len(lines)
    raw = n / sb.raw_client(topic, n)
    ports = [6192 + k for k in range(workers)]
    env = {"PQL_PARTITIONS": str(partitions)}
    procs = [start(prefix, port, **env) for port in ports]
    try:
        while sum(sb.metric(p, "pql_events_consumed_total") for p in ports) == 0:
            if any(w.poll() is not None for w in procs):
                raise RuntimeError(f"worker exited; read benchmarks/out/{prefix}*.log")
            time.sleep(0.02)
        t0 = time.perf_counter()
        t1, outputs, handoffs = sb.drain(ports, [prefix + "pql.handoffs", prefix + "pql.signals"], n, expected)
    finally:
        for w in procs:
            w.send_signal(signal.SIGTERM)
        for w in procs:
            w.wait(90)
        sb.drop_topics(prefix)
    same = sorted(set(handoffs)) == want and len(handoffs) == len(want)
    if outputs < expected:
        print(f"({partitions} partitions: {outputs:,} of {expected:,} outputs, then none for 60 s; "
              f"read benchmarks/out/{prefix}*.log)", flush=True)
        return 0.0, raw, same
    return n / (t1 - t0), raw, same


def idle_cpu(partitions: int, seconds: float) -> float:
    """% of a core a ready worker with no input takes."""
    prefix = f"idle{partitions}t{int(time.time())}."
    port = 6195
    w = start(prefix, port, PQL_PARTITIONS=str(partitions))
    try:
        deadline = time.time() + 300
        while not ready(port):
            if w.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"idle worker did not get ready; read benchmarks/out/{prefix}{port}.log")
            time.sleep(0.5)
        time.sleep(10)  # start-up work (recovery, first reports) done
        c0, t0 = cpu_seconds(w.pid), time.monotonic()
        time.sleep(seconds)
        return 100 * (cpu_seconds(w.pid) - c0) / (time.monotonic() - t0)
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(90)
        sb.drop_topics(prefix)


def p99(partitions: int, rate: float, seconds: float, accounts: int) -> float | None:
    os.environ["PQL_PARTITIONS"] = str(partitions)
    prefix = f"lat{partitions}t{int(time.time())}."
    try:
        seen, _ = sb.latency(prefix, seconds, rate, accounts)
    finally:
        del os.environ["PQL_PARTITIONS"]
        sb.drop_topics(prefix)
    if len(seen) < 2:
        return None
    return statistics.quantiles([read - ev for _, ev, _, read in seen], n=100)[98]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=20_000)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--latency-seconds", type=float, default=30)
    ap.add_argument("--pair", type=int, default=64, help="partitions of the one-vs-two-workers run (0: none)")
    ap.add_argument("--skip-latency", action="store_true")
    a = ap.parse_args()
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    lines = list(Simulator(accounts=a.accounts, seed=1).events(a.events))
    expected, want = expected_outputs(lines)
    print(f"{len(lines):,} events, {a.accounts:,} accounts, product.events 4 partitions; {expected:,} outputs, "
          f"{len(want):,} handoffs expected (replay)")
    print("| PQL_PARTITIONS | worker events/s | raw client events/s | worker / raw | live == replay | idle CPU, % of a core "
          f"| p99 event -> handoff at {a.rate:,.0f}/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = None
    for p in a.partitions:
        rate, raw, same = throughput(p, lines, expected, want)
        first = first or rate or None
        idle = idle_cpu(p, a.idle_seconds)
        lat = None if a.skip_latency else p99(p, a.rate, a.latency_seconds, 5000)
        of = f"{rate / first:.2f} of the first" if first else "-"
        print(f"| {p} | {rate:,.0f} ({of}) | {raw:,.0f} | {rate / raw:.2f} | "
              f"{'yes' if same else 'NO'} | {idle:.1f} | {'-' if lat is None else f'{lat:.0f} ms'} |", flush=True)
    if a.pair:
        one, raw1, same1 = throughput(a.pair, lines, expected, want, workers=1)
        two, raw2, same2 = throughput(a.pair, lines, expected, want, workers=2)
        print(f"\n{a.pair} partitions: one worker {one:,.0f} events/s (live == replay: {same1}), two workers "
              f"{two:,.0f} events/s ({two / one:.2f}x; live == replay: {same2}); raw client {raw1:,.0f} / {raw2:,.0f}")


if __name__ == "__main__":
    main()
