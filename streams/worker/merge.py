"""Input partitions merged by event time, before routing (the ingest tier; docs/semantics.md).

Producers that key by user, or not at all, spread one account's events over every partition of
product.events. Each partition is (about) in time order, but a consumer reads them in chunks: after
a backlog, one partition can be read days of event time ahead of another. Like Kafka Streams, the
ingest tier holds what it has read per partition and passes on the event with the earliest
(timestamp, messageId) among the partition heads, and only while no partition that still has unread
data (the broker's high watermark is past what we read) has nothing held. A partition that has
caught up does not hold the others back; one that has unread data holds them at most `max_wait`
seconds (a slow fetch must not stall the pipeline).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Hashable

MAX_HELD = 100_000  # messages held in all; beyond it the earliest go on without waiting


class Merge:
    def __init__(self, max_wait: float):
        self.max_wait = max_wait
        self.queues: dict[tuple[str, int], deque] = {}   # (topic, partition) -> deque of (ms, messageId, offset, item)
        self.held = 0
        self.blocked_since: float | None = None

    def add(self, tp: Hashable, ms: int, message_id: str, offset: int, item: Any) -> None:
        self.queues.setdefault(tp, deque()).append((ms, message_id, offset, item))
        self.held += 1

    def first_offset(self, tp: Hashable) -> int | None:
        """The offset of the earliest message still held for `tp` (commits must not pass it)."""
        q = self.queues.get(tp)
        return q[0][2] if q else None

    def drop(self, tps) -> None:
        """Forget partitions this consumer no longer owns (their new owner reads them again)."""
        for tp in tps:
            q = self.queues.pop(tp, None)
            self.held -= len(q) if q else 0

    def ready(self, assigned: list, behind: Callable[[Hashable], bool], now: float) -> list:
        """The items that may go on now, in (ms, messageId) order."""
        out = []
        queues = self.queues
        waiting = [tp for tp in assigned if not queues.get(tp) and behind(tp)]  # again when a queue empties
        while self.held:
            if waiting and self.held < MAX_HELD:
                if self.blocked_since is None:
                    self.blocked_since = now
                if now - self.blocked_since < self.max_wait:
                    break
            else:
                self.blocked_since = None
            tp = min((q[0][0], q[0][1], tp) for tp, q in queues.items() if q)[2]
            q = queues[tp]
            out.append(q.popleft()[3])
            self.held -= 1
            if not q:
                waiting = [tp for tp in assigned if not queues.get(tp) and behind(tp)]
        if not self.held:
            self.blocked_since = None
        return out
