"""Publishing lines to Kafka: `pql publish` (a JSONL file) and `pql simulate` (synthetic traffic).

Keys: the account (context.groupId, or a group call's groupId) when the line names one, so each
account's events stay in order in one partition; no key otherwise.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from streams.produce import produce
from streams.tools.simulate import key_of


class Publisher:
    def __init__(self, conf: dict, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.producer = Producer({**conf, "enable.idempotence": True, "linger.ms": 5, "compression.type": "lz4",
                                  "queue.buffering.max.messages": 500_000})
        self.sent = self.keyed = self.failed = 0

    def _done(self, err, _msg) -> None:
        if err is not None:
            self.failed += 1

    def send(self, line: bytes) -> None:
        key = key_of(line)
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
