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
has processed its log up to the fence. Reports are merged into one cumulative `Heard` per record read
(O(sources)); a fence puts one rung on the ladder of each partition it names, and a partition moves
to the highest rung it has passed: O(partitions) per tick, not partitions squared.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

from streams.worker.envelope import ANSWERS, IDLE, INPUT, OFFSET, WATERMARK

NOTHING = -IDLE  # the barrier of a partition that has not heard from every source yet
KEEP = 128  # rungs kept per partition: the newest a tick apart, older ones thinned out (`_rung`), the
#            oldest kept, so a partition taken over far behind its log counts from its first rung on
SNAPSHOTS = 2048  # records' snapshots kept (a fence names an offset read a tick or two before it)

Report = tuple[int, int]  # (tick ms, time or IDLE)


def lowest(reports: Iterable[Report]) -> int:
    """The lowest report: an idle one counts as its tick."""
    return min((tick if v >= IDLE else v for tick, v in reports), default=IDLE)


@dataclass(frozen=True, eq=False)
class Heard:
    """The newest report of each source, by kind: accounts partitions (`told`), product.events
    partitions (`inputs`), sales.responses partitions (`answers`), and the offset below which each
    accounts partition has processed and committed its log (`offsets`: (tick, offset)). Never changed
    in place."""

    told: dict[int, Report] = field(default_factory=dict)
    inputs: dict[int, Report] = field(default_factory=dict)
    answers: dict[int, Report] = field(default_factory=dict)
    seq: int = 0  # the batch it is (0: none)
    offsets: dict[int, Report] = field(default_factory=dict)

    def merged(self, reports: Iterable[tuple[str, int, Report]], seq: int | None = None) -> "Heard":
        """A copy with these (kind, source, report) in; a report older than the one kept is ignored."""
        out = {WATERMARK: dict(self.told), INPUT: dict(self.inputs), ANSWERS: dict(self.answers),
               OFFSET: dict(self.offsets)}
        for kind, source, report in reports:
            into = out[kind]
            if report > into.get(source, (0, 0)):
                into[source] = report
        return Heard(out[WATERMARK], out[INPUT], out[ANSWERS], self.seq if seq is None else seq, out[OFFSET])

    def committed(self, partition: int) -> int:
        """The offset below which that accounts partition has committed its log (-1: not told)."""
        return self.offsets.get(partition, (0, -1))[1]

    def speaks_offsets(self, partition: int) -> bool:
        """Does that partition's owner report its offsets (this release or later)? Its latest
        report came with one."""
        told, offset = self.told.get(partition), self.offsets.get(partition)
        return told is not None and offset is not None and offset[0] >= told[0]

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
    """What this worker has read of `<app>-progress`, and what each partition counts (`view`).

    `logged` is every report read, merged in the topic's order; `snapshots` keep what it was after
    each record. A fence (offset X, {partition: high watermark h}) says: every report in a record
    below X counts for that partition once it has processed its log up to h. A worker makes one at
    each tick for the partitions it owns (X: how far it had read the topic when it asked for the
    watermarks) and writes it to the topic, so the partitions' next owners climb the same ladder:
    a partition taken over with a backlog counts the old owner's reports as it passes their fences
    (each partition's `ladders`), not only once its whole backlog is done."""

    def __init__(self, keep: int = KEEP, snapshots: int = SNAPSHOTS):
        self.keep, self.kept = keep, snapshots
        self.logged = EMPTY
        self.snapshots: list[tuple[int, Heard]] = []  # (offset after the record, `logged` then)
        self.ladders: dict[int, list[tuple[int, Heard]]] = {}  # fences rising, batches newer as they rise
        self.views: dict[int, Heard] = {}
        self.at: dict[int, int] = {}  # partition -> the position it last counted at

    def hear(self, reports: list[tuple[str, int, Report]], after: int) -> None:
        """The reports of the record just below offset `after`."""
        if not reports:
            return
        self.logged = self.logged.merged(reports, seq=self.logged.seq + 1)
        self.snapshots.append((after, self.logged))
        if len(self.snapshots) > 2 * self.kept:
            del self.snapshots[: self.kept]

    def below(self, offset: int) -> Heard | None:
        """Every report read in records below `offset` (None: none read, or not kept)."""
        i = bisect_right(self.snapshots, offset, key=lambda s: s[0])
        return self.snapshots[i - 1][1] if i else None

    def fence(self, offset: int, ends: dict[int, int]) -> None:
        heard = self.below(offset)
        if heard is not None:
            for p, end in ends.items():
                if end >= 0:  # (not a high watermark: no fence)
                    self._rung(self.ladders.setdefault(p, []), end, heard)

    def _rung(self, ladder: list[tuple[int, Heard]], end: int, heard: Heard) -> None:
        """Keeps only rungs that are newer as they are higher: one no newer than a lower rung is useless."""
        i = bisect_right(ladder, end, key=lambda r: r[0])
        if i and ladder[i - 1][1].seq >= heard.seq:
            return
        if i and ladder[i - 1][0] == end:  # as high and older
            i -= 1
        j = i
        while j < len(ladder) and ladder[j][1].seq <= heard.seq:
            j += 1
        ladder[i:j] = [(end, heard)]
        if len(ladder) > self.keep:  # every other rung of the older half goes (not the lowest): the
            del ladder[1:len(ladder) // 2:2]  # older the rungs, the sparser, back to the oldest fence

    def promote(self, partition: int, position: int) -> bool:
        """Partition `partition` has processed its log below `position`: it counts the newest batch
        whose fence that passes. True if what it counts changed."""
        last, self.at[partition] = self.at.get(partition), position
        if last is not None and position < last:  # read again from an earlier offset (a seek, a
            self.views.pop(partition, None)      # rollback): what it counted may be ahead of it
        ladder = self.ladders.get(partition)
        if not ladder or ladder[0][0] > position:
            return False
        i = bisect_right(ladder, position, key=lambda r: r[0])
        heard = ladder[i - 1][1]
        del ladder[:i]
        if heard.seq <= self.views.get(partition, EMPTY).seq:
            return False
        self.views[partition] = heard
        return True

    def inband(self, partition: int, kind: str, source: int, report: Report) -> None:
        """A report read in the partition's own log (tests, and envelopes of earlier versions): it
        counts at once."""
        self.views[partition] = self.view(partition).merged([(kind, source, report)])

    def view(self, partition: int) -> Heard:
        return self.views.get(partition, EMPTY)

    def forget(self, partition: int) -> None:
        """No longer ours: what it counted goes (its ladder stays: it may come back)."""
        self.views.pop(partition, None)
        self.at.pop(partition, None)
