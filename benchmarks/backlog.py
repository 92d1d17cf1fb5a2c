"""Backlog catch-up (issue 23): eight weeks of history on the input topic before the worker starts,
in time order and sorted by account then time (a warehouse export), against the local Kafka
(`make stack`). Per order: the raw client's rate over the same topic (the ceiling), the worker's
events/s from its first consumed event until every output is readable, and live == replay.

    python -m benchmarks.backlog [--events 200000] [--accounts 2000]
"""
from __future__ import annotations

import argparse
import io
import json
import time
from datetime import datetime, timedelta, timezone

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.stream_bench import BOOT, ROOT, our_worker, raw_client, same_as_replay
from detectors.engine import Engine
from schemas.rules import load_rules
from streams.config import Settings, alert_max_age_ms
from streams.produce import produce as produce_one
from streams.tools.publish import user_accounts
from streams.tools.replay import replay
from streams.tools.simulate import Simulator, key_of


def eight_weeks(accounts: int, events: int) -> list[bytes]:
    """Eight weeks that ended at the start of today; a third of the accounts act before `group`."""
    end = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return list(Simulator(accounts=accounts, seed=56, start=end - timedelta(days=56), span_ms=56 * 86_400_000,
                          late_group=0.3).events(events))


def by_account(lines: list[bytes]) -> list[bytes]:
    """Sorted by account, then time (a user's lines under its group call's account)."""
    users = user_accounts(io.BytesIO(b"\n".join(lines)))

    def key(line: bytes):
        try:
            doc = json.loads(line)
            account = key_of(line, users) or b""
            return (0, account, doc.get("timestamp", ""))
        except ValueError:
            return (1, b"", "")
    return sorted(lines, key=key)


def publish(topic: str, lines: list[bytes]) -> None:
    """As `pql publish` keys a file: by account, a user's line by its group call's account."""
    users = user_accounts(io.BytesIO(b"\n".join(lines)))
    admin = AdminClient({"bootstrap.servers": BOOT})
    for f in admin.create_topics([NewTopic(topic, 4, 1)]).values():
        f.result()
    p = Producer({"bootstrap.servers": BOOT, "linger.ms": 20, "compression.type": "lz4",
                  "queue.buffering.max.messages": 1_000_000, "batch.size": 1_000_000})
    for line in lines:
        produce_one(p, topic, line, key=key_of(line, users))
    p.flush(120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=2000)
    a = ap.parse_args([] if __name__ != "__main__" else None)
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    history = eight_weeks(a.accounts, a.events)
    for order, lines in (("time order", history), ("sorted by account", by_account(history))):
        prefix = f"backlog{int(time.time())}{'t' if order == 'time order' else 'a'}."
        out, now = io.StringIO(), int(time.time() * 1000)
        engine = Engine(load_rules(ROOT / "examples/rules.yaml"), alert_max_age_ms(Settings().alert_max_age))
        replay(lines, engine, {}, out, io.StringIO(), milestones=True, stages=True, now=now, processed_at=now)
        expected = len(out.getvalue().splitlines())
        want = sorted(json.loads(x)["id"] for x in out.getvalue().splitlines() if '"pql.handoff"' in x)
        publish(prefix + "product.events", lines)
        n = len(lines)
        print(f"backlog, {order}: {n} events over 56 days, {a.accounts} accounts, 4 partitions, on the topic "
              f"before the worker starts; {expected} outputs expected (replay), {len(want)} handoffs")
        ta = raw_client(prefix + "product.events", n)
        print(f"  confluent-kafka + json.loads : {n / ta:>9,.0f} events/s ({ta:.1f}s)")
        tc, outputs, handoffs = our_worker(prefix, n, expected)
        print(f"  pql worker, catching up      : {n / tc:>9,.0f} events/s ({tc:.1f}s), {ta / tc:.2f} of raw")
        same_as_replay(outputs, expected, handoffs, want)


if __name__ == "__main__":
    main()
