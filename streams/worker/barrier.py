"""What each <app>-accounts partition has heard of the others' progress (the barrier of
streams/worker/detect.py), and when it may count it.

A report says how far a source is at a tick: an accounts partition's stream time (WATERMARK), how
far an ingest tier has routed a product.events partition (INPUT) or a sales.responses partition
(ANSWERS); a time, or IDLE (nothing pending: counts as the tick's wall clock time). Reports travel on
the `<app>-progress` topic (streams/worker/progress.py), a few records a tick, not from every
partition to every partition.

A report may count for partition p only once p has read every line its source wrote to p before
it. Its source wrote those lines before the report (an ingest tier waits for their acks; an accounts
partition reports only what its committed transactions hold), so they lie below p's high watermark
read after the report was: that offset is the report's fence for p, and p counts the report once it
has processed its log up to the fence. Reports are merged into one cumulative `Heard` per batch
(O(sources)), and each partition moves to the newest batch whose fence it has passed: O(partitions)
per batch, not partitions squared.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

from streams.worker.envelope import ANSWERS, IDLE, INPUT, WATERMARK

NOTHING = -IDLE  # the barrier of a partition that has not heard from every source yet
KEEP = 64  # batches kept: a partition further behind keeps what it heard until it passes a kept fence

Report = tuple[int, int]  # (tick ms, time or IDLE)


def lowest(reports: Iterable[Report]) -> int:
    """The lowest report: an idle one counts as its tick."""
    return min((tick if v >= IDLE else v for tick, v in reports), default=IDLE)


@dataclass(frozen=True, eq=False)
class Heard:
    """The newest report of each source, by kind: accounts partitions (`told`), product.events
    partitions (`inputs`), sales.responses partitions (`answers`). Never changed in place."""

    told: dict[int, Report] = field(default_factory=dict)
    inputs: dict[int, Report] = field(default_factory=dict)
    answers: dict[int, Report] = field(default_factory=dict)
    seq: int = 0  # the batch it is (0: none)

    def merged(self, reports: Iterable[tuple[str, int, Report]], seq: int | None = None) -> "Heard":
        """A copy with these (kind, source, report) in; a report older than the one kept is ignored."""
        out = {WATERMARK: dict(self.told), INPUT: dict(self.inputs), ANSWERS: dict(self.answers)}
        for kind, source, report in reports:
            into = out[kind]
            if report > into.get(source, (0, 0)):
                into[source] = report
        return Heard(out[WATERMARK], out[INPUT], out[ANSWERS], self.seq if seq is None else seq)

    @cached_property
    def _two_lowest(self) -> list[tuple[int, int]]:
        return sorted((lowest([r]), p) for p, r in self.told.items())[:2]

    def lowest_told(self, but: int) -> int:
        """The lowest accounts partition's report, leaving out partition `but` (a partition does not
        wait for itself)."""
        return next((v for v, p in self._two_lowest if p != but), IDLE)

    @cached_property
    def lowest_input(self) -> int:
        return lowest(self.inputs.values())

    @cached_property
    def lowest_answer(self) -> int:
        return lowest(self.answers.values())


EMPTY = Heard()


class Reports:
    """The batches of reports this worker has read, each with its fences, and what each of its
    partitions counts (`view`). In memory: a starting worker reads the last reports again
    (progress.py, HISTORY)."""

    def __init__(self, keep: int = KEEP):
        self.latest = EMPTY
        self.batches: deque[tuple[dict[int, int], Heard]] = deque(maxlen=keep)
        self.views: dict[int, Heard] = {}

    def hear(self, reports: list[tuple[str, int, Report]], fences: dict[int, int]) -> None:
        """A batch: `fences`: partition -> its high watermark, read after these reports were."""
        self.latest = self.latest.merged(reports, seq=self.latest.seq + 1)
        self.batches.append((fences, self.latest))

    def promote(self, partition: int, position: int) -> bool:
        """Partition `partition` has processed its log below `position`: it counts the newest batch
        whose fence that passes. True if what it counts changed."""
        current = self.views.get(partition, EMPTY)
        for fences, heard in reversed(self.batches):
            if heard.seq <= current.seq:
                return False
            fence = fences.get(partition)
            if fence is not None and fence <= position:
                self.views[partition] = heard
                return True
        return False

    def inband(self, partition: int, kind: str, source: int, report: Report) -> None:
        """A report read in the partition's own log (tests, and envelopes of earlier versions): it
        counts at once."""
        self.views[partition] = self.view(partition).merged([(kind, source, report)])

    def view(self, partition: int) -> Heard:
        return self.views.get(partition, EMPTY)

    def forget(self, partition: int) -> None:
        self.views.pop(partition, None)
