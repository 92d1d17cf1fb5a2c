"""The worker's tick (streams/worker/progress.py): a partition reports only what its committed
transactions hold, is idle only when it has read and committed its whole log, and gets a tick line
only when a tick has something to decide."""
import asyncio
import json
from types import SimpleNamespace

from faust.types import TP

from schemas.formats import unversioned
from streams.worker import envelope, eos, progress
from test_ingest import Msg
from test_publish import TOPICS, Tx, qualifying_envelope, setup


def _progress(committed: dict[int, int]):
    tables, detector, pub = setup(Tx())
    app = SimpleNamespace(consumer=SimpleNamespace(_committed_offset={TP(TOPICS.accounts, p): o for p, o in committed.items()}))
    settings = SimpleNamespace(confluent=lambda: {}, app_id="app", catchup_commit_interval=1.0)
    return progress.Progress(app, settings, TOPICS, detector, pub, feed=None), detector, pub


def test_a_report_tells_what_the_last_commit_holds():
    pr, detector, pub = _progress({})
    p = envelope.partition_of("acme", 4)
    pub.processed[p], pub.reported[p] = 10, (1000, 900)
    pr.noted()
    pub.processed[p], pub.reported[p] = 20, (2000, 1900)  # published, not committed yet
    pr.noted()
    assert pr.committed(p) is None  # nothing committed since the partition was assigned
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, p)] = 10
    assert pr.committed(p) == (1000, 900)
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, p)] = 20
    assert pr.committed(p) == (2000, 1900)


def test_a_partition_is_idle_once_it_has_read_and_committed_its_log(monkeypatch):
    pr, detector, pub = _progress({1: 50})
    where = {"position": 50, "delivered": 49}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (where["position"], where["delivered"]))
    pub.processed[1] = 50
    assert pr.idle(1, 50)
    assert not pr.idle(1, 51)  # a line below the high watermark not read yet
    where["delivered"] = 50
    assert not pr.idle(1, 50)  # delivered to the stream, not processed yet
    where["delivered"], pub.processed[1] = 49, 50
    pr.app.consumer._committed_offset[TP(TOPICS.accounts, 1)] = 45
    assert not pr.idle(1, 50)  # processed, not committed: its forwards may still be aborted
    where["position"] = None
    assert not pr.idle(1, 50)


def test_a_progress_record_reads_back_as_its_reports_and_fences():
    lines = [envelope.told(envelope.WATERMARK, 3, 1000, 900), envelope.told(envelope.INPUT, 100_001, 1000, envelope.IDLE),
             envelope.fence("w1", 77, {0: 12, 5: 0}), envelope.offsets(1000, {3: 41, 7: 0})]
    (body,) = envelope.pack_all(lines)
    assert progress.parse(body) == ([("w", 3, (1000, 900)), ("i", 100_001, (1000, envelope.IDLE)),
                                     ("c", 3, (1000, 41)), ("c", 7, (1000, 0))],
                                    [("w1", 77, {0: 12, 5: 0})])


def test_only_a_partition_with_something_to_decide_gets_a_tick():
    tables, detector, pub = setup(Tx())
    p = envelope.partition_of("acme", 4)
    assert not pub.needs_tick(p, 0)  # nothing there: an idle partition costs nothing
    result = asyncio.run(detector.process(qualifying_envelope("acme"), p))
    assert asyncio.run(pub.publish(result, p, offset=0))
    (due, _), = unversioned(json.loads(tables.clocks.data[str(p)])).values()
    assert not pub.needs_tick(p, due - 1) and pub.needs_tick(p, due)  # the handoff's SLA clock
    tables.clocks.data[f"w{p}"] = json.dumps({"stream": 0, "accounts": {"acme": 5}}).encode()
    assert pub.needs_tick(p, 0)  # a decision waits


class _Log:
    """A one-partition <app>-progress: what a tick writes, and a reader of it."""

    def __init__(self):
        self.records: list[bytes] = []

    def producer(self):
        log = self

        class P:
            def produce(self, topic, value, **kw):
                log.records.append(value)

            def poll(self, t):
                return 0

            def flush(self, t):
                return 0
        return P()

    def reader(self):
        log = self

        class R:
            at = 0

            def consume(self, n, timeout):
                out = [Msg(TOPICS.progress, 0, o, log.records[o]) for o in range(self.at, min(len(log.records), self.at + n))]
                self.at += len(out)
                return out
        return R()


class _Loop:
    def report(self, ms):
        return None

    def tick(self, partitions, ms):
        pass


def _worker(log: _Log, owned: list[int], ends: dict[int, int], monkeypatch):
    pr, detector, pub = _progress({})
    detector.inputs = None  # no ingest tier here: the partitions' own reports are the test
    pub.tx.owned = lambda: set(owned)  # (eos.Transactions.owned: Faust's assignment as of the last rebalance)
    pr.feed = SimpleNamespace(loop=_Loop())
    pr.reader, pr.producer = log.reader(), log.producer()
    pr._ends = lambda asked: {p: ends[p] for p in asked}
    return pr, detector, pub


def test_a_partition_taken_over_counts_the_old_owners_fences_as_it_catches_up(monkeypatch):
    """Worker A owns partitions 0-2 and ticks while they grow; it dies; worker B, started later,
    reads the topic's history and takes partition 0 over from its last commit: it counts what A's
    fences say at each point of its backlog, not nothing until its backlog is done."""
    log, ends = _Log(), {0: 0, 1: 0, 2: 0}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (None, None))  # nothing idle: reports come from commits
    a, _, pub_a = _worker(log, [0, 1, 2], ends, monkeypatch)
    pub_a.needs_tick = lambda p, now: True  # (each tick has something to decide: its second fence is made)
    for t in range(1, 6):
        for p in (0, 1, 2):
            ends[p] = 100 * t
            pub_a.processed[p], pub_a.reported[p] = 100 * t, (t * 1000, t * 1000)
        a.noted()
        a.app.consumer._committed_offset.update({TP(TOPICS.accounts, p): 100 * t for p in (0, 1, 2)})
        asyncio.run(a.tick())
    assert any(envelope.FENCE.encode() in r for r in log.records)
    ends.update({0: 900, 1: 900, 2: 900})
    b, detector_b, _ = _worker(log, [0], ends, monkeypatch)
    b._read()
    heard = detector_b.heard
    assert heard.view(0).told == {}
    assert heard.promote(0, 250)  # A's fence at 200 passed: A's reports read before it count
    assert {at for _, at in heard.view(0).told.values()} == {2000}  # A's tick 2 reports, read back under its fence
    assert heard.promote(0, 500)  # (tick 5's second fence would go out with tick 6's record)
    assert {at for _, at in heard.view(0).told.values()} == {4000}


def test_a_tick_with_nothing_to_decide_reads_the_ends_once_and_its_reports_count_at_the_next(monkeypatch):
    """The second fence (our own reports counted in the same tick) is made only when a partition has
    something to decide; else the next tick's first fence counts them: one ListOffsets per idle tick."""
    log, ends = _Log(), {0: 0, 1: 0}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (None, None))
    pr, detector, pub = _worker(log, [0, 1], ends, monkeypatch)
    calls, ticks = [], []
    pr._ends = lambda asked: calls.append(list(asked)) or {p: ends[p] for p in asked}
    pr.feed.loop.tick = lambda partitions, ms: ticks.append(list(partitions))

    def tick(t):
        for p in (0, 1):
            ends[p] = pub.processed[p] = 100 * t
            pub.reported[p] = (t * 1000, t * 1000)
        pr.noted()
        pr.app.consumer._committed_offset.update({TP(TOPICS.accounts, p): 100 * t for p in (0, 1)})
        asyncio.run(pr.tick())

    tick(1)
    tick(2)
    assert len(calls) == 2 and ticks == [[], []]
    heard = detector.heard
    assert heard.promote(0, 200)  # (partition 0 has read its log up to the fence)
    assert {at for _, at in heard.view(0).told.values()} == {1000}  # tick 1's, counted under tick 2's fence
    pub.needs_tick = lambda p, now: p == 1
    tick(3)
    assert len(calls) == 4 and ticks[-1] == [1]  # something to decide: the second fence too
    assert heard.promote(0, 300)
    assert {at for _, at in heard.view(0).told.values()} == {3000}  # this tick's own, in this tick


def test_a_tick_with_nothing_to_do_or_tell_is_skipped_until_something_moves(monkeypatch):
    """progress._quiet: after a full tick, ticks that would find nothing new (no partition processed
    anything or waits for a decision, no other worker's offsets or inputs moved) write nothing and ask
    the broker nothing; every QUIET_MAX a full one goes out anyway."""
    log, ends = _Log(), {0: 100, 1: 100}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (None, None))
    pr, _, pub = _worker(log, [0, 1], ends, monkeypatch)
    calls = []
    pr._ends = lambda asked: calls.append(1) or {p: ends[p] for p in asked}
    clock = [1_000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    pub.processed.update({0: 100, 1: 100})
    pub.reported.update({0: (500, 500), 1: (500, 500)})
    pr.noted()
    pr.app.consumer._committed_offset.update({TP(TOPICS.accounts, p): 100 for p in (0, 1)})

    def tick(seconds=1.0):
        clock[0] += seconds
        written = len(log.records)
        asyncio.run(pr.tick())
        return len(log.records) > written

    def other(*lines):  # another worker's record on <app>-progress
        (body,) = envelope.pack_all(list(lines))
        log.records.append(body)

    waits = []
    monkeypatch.setattr(eos, "fetch_wait", lambda app, ms: waits.append(ms))
    assert tick()  # the first tick is full
    assert not tick() and not tick() and len(calls) == 1  # nothing moved: skipped
    assert waits == [eos.FAUST_FETCH_WAIT_MS] + 2 * [eos.QUIET_FETCH_WAIT_MS]  # quiet: longer empty fetches
    pr.app.rebalancing = True
    tick()
    assert len(waits) == 3, "a rebalance sets its own fetch wait"
    pr.app.rebalancing = False
    pub.processed[1] = 140  # a partition of ours processed something
    assert tick() and not tick()
    other(envelope.offsets(2_000, {7: 50}))  # another worker's partition 7 committed up to 50
    assert tick() and not tick()
    other(envelope.told(envelope.INPUT, 3, 3_000, envelope.IDLE))  # an input idle: only its tick moved
    assert not tick()
    other(envelope.told(envelope.INPUT, 3, 4_000, 3_900))  # input 3 has events pending
    assert tick() and not tick()
    pub.needs_tick = lambda p, now: p == 0  # a decision waits
    assert tick()
    pub.needs_tick = lambda p, now: False
    assert not tick()
    assert tick(progress.QUIET_MAX / 1000)  # the longest a quiet worker goes without a full tick


def test_the_tick_tells_the_transactions_how_far_behind_the_worker_is(monkeypatch):
    """Commits are spaced while a partition is far behind its log (eos.guard_commits): the tick
    measures it, the furthest-behind owned partition (processed offset to high watermark)."""
    log, ends = _Log(), {0: 700, 1: 40}
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (None, None))
    pr, _, pub = _worker(log, [0, 1], ends, monkeypatch)
    pub.processed.update({0: 100, 1: 40})
    asyncio.run(pr.tick())
    assert pub.tx.behind == (600, 1.0)
    pub.processed[0] = 700
    asyncio.run(pr.tick())
    assert pub.tx.behind == (0, 1.0)


def test_a_partition_without_a_high_watermark_gets_no_fence():
    from concurrent.futures import Future

    pr, _, _ = _progress({})

    def answered(offset):
        f = Future()
        f.set_result(SimpleNamespace(offset=offset))
        return f

    pr.admin = SimpleNamespace(list_offsets=lambda asked, **kw: {
        tp: answered(-1001 if tp.partition == 0 else 40) for tp in asked})
    assert pr._ends([0, 1]) == {1: 40}


def test_a_partition_whose_report_lags_says_where_it_is_every_15_s(monkeypatch, caplog):
    pr, detector, pub = _progress({1: 40})
    monkeypatch.setattr(eos, "read_to", lambda app, tp: (60, 59))
    detector.stream[1], pub.processed[1] = 70_000, 60
    detector.heard.hear([("w", 0, (99_000, 100_000)), ("w", 2, (99_000, envelope.IDLE))], 1)  # the newest: 100 s
    caplog.set_level("INFO", logger="pql.progress")
    pr._behind(1, 500_000, 90_000, 80, pr._front())  # 10 s behind the newest report: nothing to say
    pr._behind(1, 500_000, -envelope.IDLE, 80, pr._front())  # nothing heard yet (the barrier warning says who)
    pr._behind(1, 500_000, envelope.IDLE, 80, pr._front())
    assert caplog.messages == []
    pr._behind(1, 500_000, 75_000, 80, pr._front())
    pr._behind(1, 510_000, 75_000, 80, pr._front())  # said 10 s ago
    (said,) = caplog.messages
    assert said.startswith("partition 1 reports 25 s behind the newest report: read up to 60 of 80")
    assert "committed 40" in said and "its stream time 30 s behind" in said
    pr._behind(1, 515_000, 75_000, 80, pr._front())
    assert len(caplog.messages) == 2
