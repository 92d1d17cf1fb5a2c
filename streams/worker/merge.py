"""Input partitions merged by event time, before routing (the ingest tier; docs/semantics.md).

Producers that key by user, or not at all, spread one account's events over every partition of
product.events. Each partition is (about) in time order, but a consumer reads them in chunks: after
a backlog, one partition can be read days of event time ahead of another. Like Kafka Streams, the
ingest tier holds what it has read per partition and passes on the event with the earliest
(timestamp, messageId) among the partition heads, and only while no partition that still has unread
data (the broker's high watermark is past what we read) has nothing held. A partition that has
caught up does not hold the others back; one that has unread data holds them at most `max_wait`
seconds (a slow fetch must not stall the pipeline).

"Caught up" is as of the partition's last fetch. A backlog published while the worker runs reaches
one partition's fetch a moment before another's: the first would run weeks of event time ahead,
past the rules' lateness, and the account's own older events would come too late (test_backlog,
1 run in 8). So before events more than `skew` past what a caught-up partition last gave go on,
`unconfirmed` names it and the ingest tier asks the broker for its end anew.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Hashable

MAX_HELD = 100_000  # messages held in all; beyond it the earliest go on without waiting


class Merge:
    def __init__(self, max_wait: float, skew: int = 0):
        self.max_wait, self.skew = max_wait, skew
        self.queues: dict[tuple[str, int], deque] = {}   # (topic, partition) -> deque of (ms, messageId, offset, item)
        self.held = 0
        self.blocked_since: float | None = None
        self.top = 0  # the newest event time added
        self.known: dict[Hashable, int] = {}  # partition -> newest event time it gave, or `top` when confirmed

    def add(self, tp: Hashable, ms: int, message_id: str, offset: int, item: Any) -> None:
        self.queues.setdefault(tp, deque()).append((ms, message_id, offset, item))
        self.held += 1
        if ms > self.top:
            self.top = ms
        if ms > self.known.get(tp, 0):
            self.known[tp] = ms

    def unconfirmed(self, assigned: list, behind: Callable[[Hashable], bool]) -> list:
        """Partitions that look caught up, with nothing held, while held events reach more than `skew`
        past the newest they gave (or past where they were last confirmed): ask the broker for their
        ends before `ready` (each is named once per `skew` of event time). Nothing held: nothing to ask."""
        out = []
        if not self.held:
            return out
        for tp in assigned:
            if not self.queues.get(tp) and self.top > self.known.get(tp, 0) + self.skew and not behind(tp):
                self.known[tp] = self.top
                out.append(tp)
        return out

    def first_offset(self, tp: Hashable) -> int | None:
        """The offset of the earliest message still held for `tp` (commits must not pass it)."""
        q = self.queues.get(tp)
        return q[0][2] if q else None

    def drop(self, tps) -> None:
        """Forget partitions this consumer no longer owns (their new owner reads them again)."""
        for tp in tps:
            q = self.queues.pop(tp, None)
            self.held -= len(q) if q else 0
            self.known.pop(tp, None)

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
