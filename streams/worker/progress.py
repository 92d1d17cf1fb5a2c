"""The worker's tick, every PQL_SLA_TICK seconds: progress reports in and out, then tick lines.

1. The ingest tier writes its report (`Ingest.report`) to `<app>-progress`: how far each of its input
   partitions is routed (an ingest process writes its own).
2. The records written to `<app>-progress` since the last tick, this worker's own included (one
   partition; a starting worker reads the last HISTORY seconds): their reports, and the fences the
   other workers made (streams/worker/barrier.py).
3. The high watermark of each `<app>-accounts` partition this worker owns (one ListOffsets request):
   every report read so far counts for that partition once it has processed its log up to it. That
   fence goes to `<app>-progress` too, so the partition's next owner can climb it.
4. This worker's report of each partition it owns (`Detect.report`): idle when the partition has
   read its log up to that high watermark and committed all it processed; else its stream time as
   of its last commit (noted before each commit: `noted`); and, in one line, the offset below which
   each one's log is committed (a group call's slots: streams/worker/detect.py `_released`). Written
   to `<app>-progress`; when a partition has something to decide (step 6), once acked, the worker
   reads the topic up to it and makes a second fence (steps 2-3 again), so its own reports count in
   the same tick (that fence goes out with the next tick's record).
5. A partition that has read its log up to its fence counts the batch at once; the others when
   `detect` gets there.
6. A tick line to each owned partition a tick has something to decide for (`Publisher.needs_tick`:
   accounts waiting, an SLA clock due). An idle partition costs nothing.
A tick with nothing to do or tell is skipped (`_quiet`): at most QUIET_MAX apart, a full one.

Per tick: a record per worker and one per ingest tier, one or two ListOffsets per worker, work linear
in the partitions; nothing in a quiet tick but reading `<app>-progress`. (The reports used to be
lines from every partition to every other one: issue 25.)
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from faust.types import TP

from schemas import formats
from schemas.formats import NewerFormat, check_headers
from streams.produce import produce
from streams.topics import Topics
from streams.worker import envelope, eos, metrics
from streams.worker.detect import refuse

log = logging.getLogger("pql.progress")
HISTORY = 600  # s of reports a starting worker reads (`_clients`): the fences of a partition minutes behind
FLUSH_WAIT = 1.0  # s a tick waits for its record's ack before reading it back
QUIET_MAX = 10_000  # ms a worker with nothing to do or tell goes without a full tick at most (`_quiet`)
SILENT_WARN = 30_000  # ms an owned partition may tell nothing before the worker says why
BEHIND_INFO = 20_000  # ms an owned partition's report may be behind its tick before the worker says why


def parse(body: bytes) -> tuple[list[tuple[str, int, tuple[int, int]]], list[tuple[str, int, dict[int, int]]]]:
    """A progress record's reports, (kind, source, (tick ms, time or IDLE)), and fences, (writer,
    offset, {partition: high watermark}); other lines are skipped."""
    reports, fences = [], []
    for kind, key, raw in envelope.unpack(body):
        if kind == envelope.OFFSET and key == "*":
            reports += [(kind, p, told) for p, told in envelope.offsets_value(raw)]
        elif kind in envelope.REPORTS:
            reports.append((kind, int(key), envelope.told_value(raw)))
        elif kind == envelope.FENCE:
            fences.append((key, *envelope.fence_value(raw)))
    return reports, fences


def records_behind(ends: dict[int, int], done: dict[int, int]) -> int:
    """Records of the owned <app>-accounts partitions not processed yet, in all (`ends`: their high
    watermarks; `done`: the next offset each has to process). In all, not the most of one: at 64
    partitions a backlog spreads thin, no partition was ever CATCHUP_RECORDS behind, and the worker
    committed every PQL_COMMIT_INTERVAL through it: 64 transactions each time (session 21)."""
    return sum(max(end - done[p], 0) for p, end in ends.items() if p in done)


class Progress:
    def __init__(self, app, settings, topics: Topics, detector, publisher, feed):
        self.app, self.topics, self.detector, self.publisher, self.feed = app, topics, detector, publisher, feed
        self.conf = settings.confluent()
        self.catchup = settings.catchup_commit_interval
        self.group = f"{settings.app_id}-progress"
        self.notes: dict[int, deque[tuple[int, tuple[int, int]]]] = {}  # partition -> (offset, reported) per commit
        self.reader = self.admin = self.producer = None
        self.calm: tuple | None = None  # what the last full tick saw (`_quiet`); None: make the next one full
        self.asked: tuple[list[int], dict] = ([], {})  # the owned partitions, and their ListOffsets request (`_ends`)
        self.me = uuid.uuid4().hex[:12]  # names this worker's fences (it counts its own at once)
        self.read: int | None = None  # the offset after the last record read
        self.acked: int | None = None  # the offset of our last record acked
        self.later: list = []  # the second fence of the last tick, written with this tick's record
        self.silent: dict[int, int] = {}  # partition -> since when it has told nothing (ms)
        self.warned: dict[int, int] = {}
        self.told_behind: dict[int, int] = {}
        # The tick's blocking calls run on a thread of their own: in the shared executor they queued
        # behind the other tiers' polls, and a tick that never ends holds every decision in silence
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pql-tick")
        self.started: float | None = None  # monotonic time the running tick started (None: none running)

    def noted(self) -> None:
        """Before each commit (eos.guard_commits, under the publishing lock): what each partition's
        transaction holds up to which offset."""
        reported = self.publisher.reported
        for p, offset in self.publisher.processed.items():
            q = self.notes.setdefault(p, deque(maxlen=16))
            if not q or q[-1][0] != offset:
                q.append((offset, reported[p]))

    def committed(self, p: int) -> tuple[int, int] | None:
        """(stream time, `_processed`) as of partition p's last commit, None before one."""
        at = eos.committed(self.app, TP(self.topics.accounts, p))
        q = self.notes.get(p)
        if at is None or not q:
            return None
        while len(q) > 1 and q[1][0] <= at:  # older notes are of earlier commits
            q.popleft()
        return q[0][1] if q[0][0] <= at else None

    def idle(self, p: int, end: int) -> bool:
        """Has partition p read its log up to `end` and committed everything it processed?"""
        position, delivered = eos.read_to(self.app, TP(self.topics.accounts, p))
        done = self.publisher.processed.get(p)
        if position is None or position < end:
            return False
        if delivered is not None and (done is None or done <= delivered):
            return False  # a message delivered to the stream is not processed yet
        return done is None or eos.committed(self.app, TP(self.topics.accounts, p)) == done

    def _clients(self) -> None:
        """The reader starts HISTORY seconds back: a worker restarted while another worker's input
        partitions wait for their next owner (a member killed: up to PQL_SESSION_TIMEOUT) learns
        their last reports at once. Reading from the end, its partitions heard nothing of them,
        reported "nothing yet", and held every decision of every worker for minutes (cluster chaos
        seed 2, session 13)."""
        from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient

        self.reader = Consumer({**self.conf, "group.id": self.group, "enable.auto.commit": False,
                                "isolation.level": "read_committed"})
        since = int(time.time() * 1000) - HISTORY * 1000
        try:
            (start,) = self.reader.offsets_for_times([TopicPartition(self.topics.progress, 0, since)], timeout=10)
            offset = start.offset if start.offset >= 0 else OFFSET_END
        except Exception as err:  # the next ticks' reports come anyway
            log.info("progress: could not find where the last %d s of reports start (%s)", HISTORY, err)
            offset = OFFSET_END
        self.reader.assign([TopicPartition(self.topics.progress, 0, offset)])
        self.admin = AdminClient(self.conf)
        self.producer = Producer({**self.conf, "linger.ms": 0, "acks": "all"})

    def _read(self, msgs: list | None = None) -> None:
        """Take in the records read (`msgs`), else those the reader has fetched already."""
        heard = self.detector.heard
        while msgs or (msgs := self.reader.consume(500, timeout=0)):
            for m in msgs:
                if m.error() is not None:
                    continue
                self.read = m.offset() + 1
                if m.value():
                    try:
                        check_headers(m.headers(), f"record {m.offset()} of {m.topic()}")
                    except NewerFormat as err:
                        refuse(err)
                    reports, fences = parse(m.value())
                    heard.hear(reports, self.read)
                    for writer, offset, ends in fences:
                        if writer != self.me:
                            heard.fence(offset, ends)
            msgs = None

    def _flush(self, loop) -> list:
        """Wait (a while) for the acks of this tick's records (ours, and the ingest tier's report),
        then read the topic up to ours. Blocking: returns the records for `_read`."""
        self.producer.flush(FLUSH_WAIT)
        ingest = getattr(loop, "producer", None)  # (an ingest process waits for its own)
        if ingest is not None:
            ingest.flush(FLUSH_WAIT)
        out, seen, deadline = [], self.read or 0, time.monotonic() + FLUSH_WAIT
        while self.acked is not None and seen <= self.acked and time.monotonic() < deadline:
            got = self.reader.consume(500, timeout=0.05)
            out += got
            seen = max([seen] + [m.offset() + 1 for m in got if m.error() is None])
        return out

    def _acked(self, err, msg) -> None:
        if err is None:
            self.acked = max(self.acked or 0, msg.offset())

    def _ends(self, owned: list[int]) -> dict[int, int] | None:
        """The high watermark of each partition (read_uncommitted: open transactions' lines count,
        so a report's fence is past every line its source wrote before it). Blocking."""
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        if self.asked[0] != owned:  # (made again only when the partitions change: 256 of them per tick)
            self.asked = (owned, {TopicPartition(self.topics.accounts, p): OffsetSpec.latest() for p in owned})
        asked = self.asked[1]
        try:
            futures = self.admin.list_offsets(asked, isolation_level=IsolationLevel.READ_UNCOMMITTED,
                                              request_timeout=5)
            ends = {tp.partition: f.result(timeout=10).offset for tp, f in futures.items()}
            # (a partition whose leader was moving came back as -1001 with no error: a fence below
            # every offset counts at once; cluster chaos, session 14, decided without a forwarded event)
            return {p: end for p, end in ends.items() if end >= 0}
        except Exception as err:  # a broker down: this tick tells and counts nothing (the barrier holds)
            log.info("progress: could not read the partitions' ends (%s); asking again with a new client", err)
            # (librdkafka's admin client kept its old leaders' epochs after a node restart and was
            # refused FENCED_LEADER_EPOCH for minutes: cluster stack test, session 13)
            from confluent_kafka.admin import AdminClient

            self.admin = AdminClient(self.conf)
            return None

    def _silent(self, p: int, now: int, end: int) -> None:
        """A partition that tells nothing (not idle, nothing committed) holds every other partition's
        decisions: past SILENT_WARN, a warning (once a minute) says where it is."""
        since = self.silent.setdefault(p, now)
        if now - since >= SILENT_WARN and now - self.warned.get(p, 0) >= 60_000:
            self.warned[p] = now
            log.warning("partition %d has told the others nothing for %.0f s (it has committed nothing since it was "
                        "assigned): %s", p, (now - since) / 1000, self._where(p, end))

    def _where(self, p: int, end: int) -> str:
        """Where partition p is in its log, for the lines that say why it holds the others."""
        tp = TP(self.topics.accounts, p)
        position, delivered = eos.read_to(self.app, tp)
        return (f"read up to {position} of {end}, last delivered {delivered}, processed up to "
                f"{self.publisher.processed.get(p)}, committed {eos.committed(self.app, tp)}")

    def _front(self) -> int | None:
        """The newest time any partition has reported (None: none yet)."""
        return max((v for _, v in self.detector.heard.logged.told.values() if 0 <= v < envelope.IDLE), default=None)

    def _behind(self, p: int, now: int, told: int, end: int, front: int | None) -> None:
        """A partition whose report is BEHIND_INFO behind the newest report of any partition (`front`)
        holds every other partition's decisions that long: every 15 s, a line says where it is (its
        log, its commits, the inputs it has counted), so a slow partition can be told from a slow barrier."""
        if told < 0 or told >= envelope.IDLE or front is None or front - told < BEHIND_INFO \
                or now - self.told_behind.get(p, 0) < 15_000:
            return
        self.told_behind[p] = now
        ladder = self.detector.heard.ladders.get(p) or []

        def behind(t: int | None) -> str:
            return "not known" if t is None or t <= 0 else "now" if t >= envelope.IDLE else f"{(front - t) / 1000:.0f} s"

        log.info("partition %d reports %s behind the newest report: %s; its stream time %s behind, its inputs counted "
                 "up to %s behind; next fence at %s (%d on the ladder)", p, behind(told), self._where(p, end),
                 behind(self.detector.stream.get(p)), behind(self.detector._processed(p)),
                 ladder[0][0] if ladder else None, len(ladder))

    async def _fence(self, owned: list[int]) -> tuple[dict[int, int], set[int], list] | None:
        """Read what is new on `<app>-progress`, then the owned partitions' high watermarks: every
        report read counts for each under that fence (at once for an idle one). Returns (ends, the
        idle partitions, the fence line to write), None when the broker did not answer."""
        self._read()
        read = self.read
        ends = await self._blocking(self._ends, owned) if owned else {}
        if ends is None:
            return None
        heard, lines = self.detector.heard, []
        if read is not None and ends:
            heard.fence(read, ends)
            lines.append(envelope.fence(self.me, read, ends))
        idle = {p for p in owned if p in ends and self.idle(p, ends[p])}
        for p in idle:
            heard.promote(p, ends[p])  # an idle partition then tells the reports it counts
        return ends, idle, lines

    def running(self, now: float) -> float:
        """Seconds the current tick has been running (0 when none is: Monitor warns past TICK_STALL)."""
        return 0.0 if self.started is None else now - self.started

    async def _blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def tick(self) -> None:
        self.started = time.monotonic()
        try:
            await self._tick()
        finally:
            self.started = None

    async def _tick(self) -> None:
        loop = self.feed.loop
        if loop is None:  # the ingest tier has not started yet
            return
        if self.reader is None:
            await self._blocking(self._clients)
        mine = self.publisher.tx.owned()  # (as of the last rebalance: asked of Faust once)
        owned = sorted(mine)
        self.publisher.forget(mine)
        self.detector.owned = set(mine)
        for kept in (self.notes, self.silent):
            for p in [p for p in kept if p not in owned]:
                del kept[p]
        now = int(time.time() * 1000)
        quiet = self._quiet(mine, now)
        if not getattr(self.app, "rebalancing", False):  # (a rebalance sets its own: eos.quick_fetches_while_rebalancing)
            eos.fetch_wait(self.app, eos.QUIET_FETCH_WAIT_MS if quiet else eos.FAUST_FETCH_WAIT_MS)
        if quiet:
            metrics.ticks_quiet.inc()
            return
        loop.report(now)
        made = await self._fence(owned)
        self.calm = None
        ticked = [p for p in owned if self.publisher.needs_tick(p, now)]
        if made is not None:
            ends, idle, lines = made
            self.publisher.tx.catching_up(records_behind(ends, self.publisher.processed), self.catchup)
            front = self._front()
            committed = {}  # (how far each log is committed: a group call's slots, detect.py `_released`)
            for p in owned:
                told = self.detector.report(p, now, p in idle, self.committed(p))
                offset = ends.get(p) if p in idle else eos.committed(self.app, TP(self.topics.accounts, p))
                if offset is not None:
                    committed[p] = offset
                if told is not None:
                    lines.append(envelope.told(envelope.WATERMARK, p, now, told))
                    self.silent.pop(p, None)
                    self._behind(p, now, told, ends.get(p, -1), front)
                else:
                    self._silent(p, now, ends.get(p, -1))
            if committed:
                lines.append(envelope.offsets(now, committed))
            for body in envelope.pack_all(self.later + lines):
                produce(self.producer, self.topics.progress, body, on_delivery=self._acked, headers=formats.HEADERS)
            if ticked:
                # Our reports count here too once acked and read back, under a second fence (else a
                # partition's report reached the others a tick later: p99 event -> handoff 1.9 s, not
                # 0.1 s). With nothing to decide, the next tick's first fence counts them.
                self._read(await self._blocking(self._flush, loop))
                again = await self._fence(owned)
                self.later = again[2] if again is not None else []  # (its fence line goes with the next record)
            else:
                self.producer.poll(0)
                self.later = []
            self.calm = (now, set(mine), dict(self.publisher.processed), self._others(mine))
        loop.tick(ticked, now)

    def _quiet(self, mine: set[int], now: int) -> bool:
        """Has a tick nothing to do or tell since the last full one (at most QUIET_MAX ago)? Then it
        is skipped: none of our partitions processed anything or has anything to decide, they are the
        same partitions, and no other worker's partition processed anything and no input is pending
        (their reports, read here). Skipping a tick is a tick that comes late: nothing counts early.
        The first decision after a quiet spell can wait a tick or two longer (docs/semantics.md)."""
        self._read()
        if self.calm is None or now - self.calm[0] >= QUIET_MAX:
            return False
        _, owned, processed, others = self.calm
        return (owned == mine and processed == self.publisher.processed and others == self._others(mine)
                and not any(self.publisher.needs_tick(p, now) for p in mine))

    def _others(self, mine: set[int]) -> tuple[dict, dict, dict]:
        """What moves when others work, from the reports heard: the committed offsets of the partitions
        other workers own, and the inputs not idle (an idle one reports only its tick)."""
        heard = self.detector.heard.logged
        return ({p: o for p, (_, o) in heard.offsets.items() if p not in mine},
                {s: v for s, (_, v) in heard.inputs.items() if v < envelope.IDLE},
                {s: v for s, (_, v) in heard.answers.items() if v < envelope.IDLE})
