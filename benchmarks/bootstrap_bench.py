"""`pql bootstrap` of 1M history events (an export sorted by account) beside `pql replay` of the same
events in time order: what seeding the tables from history costs (issue 26).

    python -m benchmarks.bootstrap_bench [--events 1000000] [--accounts 50000]   (needs `make stack`)

Runs the CLI as a user does, against the dev stack, with its own app id and topics (deleted after).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.replay_bench import OUT, ROOT, dataset_of_args, replay_only
from benchmarks.stream_bench import BOOT, drop_topics

PARTITIONS = 4


def by_account(path):
    """The history as a warehouse exports it: sorted by account (else user), then time."""
    out = path.with_name(path.stem + "-by-account.jsonl")
    if not out.exists():
        rows = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    d = json.loads(line)
                    key = str(d.get("groupId") or (d.get("context") or {}).get("groupId") or d.get("userId") or "")
                    rows.append((key, str(d.get("timestamp")), line))
                except (ValueError, AttributeError):
                    rows.append(("", "", line))
        rows.sort(key=lambda r: (r[0], r[1]))
        with open(out.with_suffix(".tmp"), "wb") as f:
            f.writelines(r[2] for r in rows)
        os.replace(out.with_suffix(".tmp"), out)
    return out


def main() -> dict:
    a, path = dataset_of_args()
    export = by_account(path)
    rules = ROOT / "examples/rules.yaml"
    baseline, _, _ = replay_only(path)  # (examples/rules.yaml, time order)

    app = f"bench-bootstrap-{int(time.time())}"
    admin = AdminClient({"bootstrap.servers": BOOT})
    topics = [NewTopic(f"{app}-accounts-changelog", PARTITIONS, 1, config={"cleanup.policy": "compact"}),
              NewTopic(f"{app}.pql.handoffs", PARTITIONS, 1), NewTopic(f"{app}.pql.signals", PARTITIONS, 1)]
    for f in admin.create_topics(topics).values():
        f.result(timeout=30)
    env = {**os.environ, "PQL_KAFKA_BOOTSTRAP": BOOT, "PQL_APP_ID": app, "PQL_TOPIC_PREFIX": f"{app}.",
           "PQL_PARTITIONS": str(PARTITIONS), "PQL_REDIS_PREFIX": f"{app}:"}
    try:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "streams.tools.cli", "bootstrap", str(export), "--rules", str(rules)],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        took = time.perf_counter() - started
    finally:
        drop_topics(f"{app}.")
        drop_topics(f"{app}-")
    if done.returncode != 0:
        raise SystemExit(f"pql bootstrap failed:\n{done.stderr}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"events": a.events, "replay_s": round(baseline, 1), "bootstrap_s": round(took, 1),
              "bootstrap_events_per_s": round(a.events / took), "bootstrap_peak_rss_mib": round(rss),
              "summary": done.stderr.strip().splitlines()[-1]}
    print("| history | `pql replay` (time order) | `pql bootstrap` (sorted by account, to Kafka) | peak RSS |")
    print("| --- | --- | --- | --- |")
    print(f"| {a.events:,} events, {a.accounts:,} accounts | {baseline:.1f} s | {took:.1f} s "
          f"({a.events / took:,.0f} events/s) | {rss:,.0f} MiB |")
    print(result["summary"])
    (OUT / "bootstrap_bench.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
