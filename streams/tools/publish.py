"""Publishing lines to Kafka: `pql publish` (a JSONL file) and `pql simulate` (synthetic traffic).

Keys: the account (context.groupId, or a group call's groupId) when the line names one, so each
account's events stay in order in one partition. `pql publish` of a file also keys a line that names
no account by the account of its user's group call in the same file (`user_accounts`, a first pass):
a warehouse export sorted by account then keeps each account's whole history on one partition, in
time order, as the worker's merge needs (docs/semantics.md, "Backlogs"). No key otherwise.
"""
from __future__ import annotations

import json
import time
from typing import IO, Callable, Iterable

from streams.produce import produce
from streams.tools.simulate import key_of


def user_accounts(f: IO[bytes]) -> dict[str, bytes]:
    """userId / anonymousId -> groupId of the user's first group call in the file."""
    found: dict[str, bytes] = {}
    for line in f:
        if b'"group"' not in line:
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and doc.get("type") == "group" and doc.get("groupId"):
            for who in (doc.get("userId"), doc.get("anonymousId")):
                if isinstance(who, str) and who:
                    found.setdefault(who, str(doc["groupId"]).encode())
    return found


class Publisher:
    def __init__(self, conf: dict, topic: str, users: dict[str, bytes] | None = None):
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5, "compression.type": "lz4",
                                  "queue.buffering.max.messages": 500_000})
        self.users = users or {}
        self.sent = self.keyed = self.failed = 0

    def _done(self, err, _msg) -> None:
        if err is not None:
            self.failed += 1

    def send(self, line: bytes) -> None:
        key = key_of(line, self.users)
        self.keyed += key is not None
        produce(self.producer, self.topic, line, key=key, on_delivery=self._done)
        self.sent += 1
        if self.sent % 1000 == 0:
            self.producer.poll(0)

    def flush(self) -> None:
        self.producer.flush(60)


def publish(lines: Iterable[bytes], pub: Publisher, rate: float | None = None,
            progress: Callable[[int], None] | None = None) -> float:
    """Send lines (optionally at `rate` per second); returns elapsed seconds."""
    started = time.perf_counter()
    for n, line in enumerate(lines, 1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        pub.send(line)
        if rate:
            ahead = n / rate - (time.perf_counter() - started)
            if ahead > 0:
                pub.producer.poll(0)
                time.sleep(ahead)
        if progress is not None and n % 5000 == 0:
            progress(n)
    pub.flush()
    return time.perf_counter() - started
