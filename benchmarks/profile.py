"""Where a second of worker CPU goes: `py-spy record` of a live `pql worker` catching up on a backlog
(needs `make stack`; py-spy is in the dev extras), summed per stage of the pipeline.

    python -m benchmarks.profile [--events 300000] [--accounts 50000] [--seconds 20]

Samples are attributed to the innermost frame that names a stage (STAGES, first match from the
leaf up): e.g. a pydantic parse called from detect's envelope decoding counts as "detect: parse".
"""
from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.stream_bench import ROOT, backlog, metric, start_worker, wait_consuming
from streams.tools.simulate import Simulator

# (stage, a substring of a frame "function (path:line)"); the innermost matching frame wins
STAGES = [
    ("state decode (JSON -> model)", "model_validate_json"),
    ("state encode (model -> JSON)", "model_dump_json"),
    ("detect: parse envelope lines (parse_event again)", "envelope.py"),
    ("engine (pure core)", "detectors/"),
    ("ingest: validate (parse_event)", "route.py"),
    ("ingest: merge by event time", "merge.py"),
    ("ingest: consume, produce, commit", "ingest.py"),
    ("alerts task", "alerts.py"),
    ("detect: agent (identity, decisions, bookkeeping)", "detect.py"),
    ("publish: sends, table writes", "publish.py"),
    ("exactly-once glue", "eos.py"),
    ("metrics", "prometheus_client"),
    ("Faust/aiokafka: stream, consumer, producer, changelog", "faust/"),
    ("Faust/aiokafka: stream, consumer, producer, changelog", "aiokafka/"),
    ("Faust/aiokafka: stream, consumer, producer, changelog", "mode/"),
    ("event loop (asyncio)", "asyncio/"),
]


def stages(raw: Path) -> tuple[int, collections.Counter, collections.Counter]:
    total, by, leaf = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = stack.split(";")
        stage = next((s for f in reversed(frames) for s, k in STAGES if k in f), "other")
        by[stage] += int(n)
        leaf[frames[-1][:100]] += int(n)
    return total, by, leaf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--accounts", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"prof{int(time.time())}."
    backlog(prefix + "product.events", list(Simulator(accounts=a.accounts, seed=1).events(a.events)))
    port = 6192
    w = start_worker(prefix, port)
    raw = out / f"{prefix}pyspy.txt"
    try:
        wait_consuming(w, port, prefix)
        spy = Path(sys.executable).with_name("py-spy")
        subprocess.run([str(spy), "record", "--pid", str(w.pid), "--duration", str(int(a.seconds)), "--rate", "200",
                        "--format", "raw", "--output", str(raw), "--nonblocking"], check=True, capture_output=True)
        consumed = metric(port, "pql_events_consumed_total")
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(60)
    total, by, leaf = stages(raw)
    print(f"py-spy: {total:,} samples over {a.seconds:.0f} s of a worker catching up on {a.events:,} events "
          f"({consumed:,.0f} consumed by the end); raw stacks: {raw}")
    print("| stage | share of samples |\n| --- | --- |")
    for s, n in by.most_common():
        print(f"| {s} | {100 * n / total:.1f} % |")
    print("\ntop innermost frames:")
    for f, n in leaf.most_common(15):
        print(f"  {100 * n / total:5.1f} %  {f}")


if __name__ == "__main__":
    main()
