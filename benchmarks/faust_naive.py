"""Baseline (b): a naive Faust agent that parses each event and updates a table per event.

    BENCH_TOPIC=... BENCH_N=... faust -A benchmarks.faust_naive worker -l warn
Prints `RESULT <events> <seconds>` (first event to the N-th) and exits.
"""
import json
import os
import time

import faust

N, TOPIC = int(os.environ["BENCH_N"]), os.environ["BENCH_TOPIC"]
app = faust.App(f"naive-{TOPIC}", broker=f"kafka://{os.environ.get('BENCH_BOOTSTRAP', '127.0.0.1:9092')}",
                store="memory://", web_enabled=False, topic_replication_factor=1, topic_partitions=4)
source = app.topic(TOPIC, key_serializer="raw", value_serializer="raw")
counts = app.Table("counts", default=int)
seen = {"n": 0, "t0": 0.0}


@app.agent(source)
async def count(stream):
    async for event in stream.events():
        if not seen["n"]:
            seen["t0"] = time.perf_counter()
        try:
            doc = json.loads(event.value)
        except ValueError:
            doc = {}
        account = ((doc.get("context") or {}).get("groupId") or doc.get("groupId") or "none") if isinstance(doc, dict) else "none"
        counts[account] += 1
        seen["n"] += 1
        if seen["n"] >= N:
            print(f"RESULT {N} {time.perf_counter() - seen['t0']:.3f}", flush=True)
            os._exit(0)
