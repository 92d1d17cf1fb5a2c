"""The barrier's reports (streams/worker/barrier.py): a report counts for a partition only once it
has processed its log up to a fence made after the report was read, per partition; a partition taken
over with a backlog climbs the old owner's fences; what is kept is bounded."""
from streams.worker.barrier import EMPTY, Heard, Reports, lowest
from streams.worker.envelope import ANSWERS, IDLE, INPUT, OFFSET, WATERMARK


def test_a_report_counts_once_the_partition_has_read_up_to_its_fence():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.fence(1, {0: 40, 2: 7})
    assert r.view(0) is EMPTY
    assert not r.promote(0, 39)  # a line partition 1 wrote before its report may still be at offset 39
    assert r.view(0) is EMPTY
    assert r.promote(0, 40) and r.view(0).told == {1: (1000, 500)}
    assert r.view(2) is EMPTY  # what partition 0 counts frees no other partition


def test_a_fence_covers_only_the_records_below_its_offset():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=5)
    r.hear([(WATERMARK, 1, (2000, 1500))], after=6)  # read after the fence's worker asked for the ends
    r.fence(5, {0: 10})
    assert r.promote(0, 10) and r.view(0).told == {1: (1000, 500)}
    r.fence(4, {3: 10})  # below every record read: nothing to count
    assert not r.promote(3, 10)


def test_a_partition_counts_the_highest_rung_it_has_passed():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.fence(1, {0: 10})
    r.hear([(WATERMARK, 1, (2000, 1500)), (INPUT, 3, (2000, IDLE))], after=2)
    r.fence(2, {0: 20})
    r.hear([(WATERMARK, 1, (3000, 2500))], after=3)
    r.fence(3, {0: 30})
    assert r.promote(0, 25) and r.view(0).told == {1: (2000, 1500)} and r.view(0).inputs == {3: (2000, IDLE)}
    assert not r.promote(0, 25)  # nothing newer passed
    assert r.promote(0, 31) and r.view(0).told == {1: (3000, 2500)}
    assert r.view(0).inputs == {3: (2000, IDLE)}  # batches are cumulative


def test_a_partition_taken_over_with_a_backlog_climbs_the_old_owners_fences():
    """The restarted worker's partition counts what the old owner's fences say as it works through
    its backlog, not only once it reaches today's end (cluster chaos seed 2, session 13)."""
    r = Reports()
    for t in range(1, 6):  # the old owner's ticks: partition 1 at time t, partition 0's log end 100 t
        r.hear([(WATERMARK, 1, (t * 1000, t * 1000 - 500))], after=t)
        r.fence(t, {0: 100 * t})
    assert r.promote(0, 250) and r.view(0).told == {1: (2000, 1500)}
    assert r.promote(0, 420) and r.view(0).told == {1: (4000, 3500)}


def test_a_rung_no_newer_than_a_lower_one_is_dropped():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.hear([(WATERMARK, 1, (2000, 1500))], after=2)
    r.fence(2, {0: 50})
    r.fence(1, {0: 60})  # a worker that had read less, and asked later
    assert len(r.ladders[0]) == 1
    r.fence(2, {0: 40})  # as new, lower: replaces the higher one
    assert r.ladders[0] == [(40, r.below(2))]
    assert not r.promote(0, 39) and r.promote(0, 40)


def test_a_partition_not_named_by_a_fence_counts_nothing():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.fence(1, {0: 10})
    assert not r.promote(5, 10**9)


def test_an_older_report_never_replaces_a_newer_one():
    heard = EMPTY.merged([(ANSWERS, 0, (2000, 900))]).merged([(ANSWERS, 0, (1000, IDLE))])
    assert heard.answers == {0: (2000, 900)}


def test_a_partition_does_not_wait_for_itself():
    heard = Heard(told={0: (1000, 100), 1: (1000, 300), 2: (5000, IDLE)})
    assert heard.lowest_told(0) == 300 and heard.lowest_told(1) == 100 and heard.lowest_told(2) == 100
    assert lowest([(5000, IDLE)]) == 5000  # idle counts as its tick


def test_what_is_kept_is_bounded():
    r = Reports(keep=4, snapshots=8)
    for n in range(1, 100):
        r.hear([(WATERMARK, 1, (n, n))], after=n)
        r.fence(n, {0: n, 7: n})
    assert len(r.ladders[0]) <= 4 and len(r.snapshots) <= 16
    assert r.promote(0, 99) and r.view(0).told == {1: (99, 99)}
    # a partition far behind (taken over at offset 5) counts the oldest fence, then climbs sparser rungs
    assert r.ladders[7][0][0] == 1 and r.promote(7, 5) and r.view(7).told == {1: (1, 1)}
    assert r.promote(7, 99) and r.view(7).told == {1: (99, 99)}


def test_an_offset_that_is_no_high_watermark_makes_no_fence():
    """ListOffsets answered -1001 for a partition whose leader was moving (cluster chaos, session
    14): as a fence it counted at once, before the partition had read its log."""
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.fence(1, {0: -1001, 2: 5})
    assert not r.promote(0, 0) and 0 not in r.ladders
    assert r.promote(2, 5)


def test_a_partition_read_again_from_an_earlier_offset_counts_nothing_it_passed_later():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], after=1)
    r.fence(1, {0: 10})
    assert r.promote(0, 12) and r.view(0).told
    r.promote(0, 8)  # a seek back to the committed offset: lines 8..9 are not processed again yet
    assert r.view(0) is EMPTY


def test_a_partitions_committed_offset_counts_under_the_same_fence_as_its_time():
    """A group call's slot is answered once its user key's partition has committed past its LINK line
    (docs/semantics.md, Group calls' answers): that offset counts like any report, under a fence."""
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500)), (OFFSET, 1, (1000, 77))], after=1)
    r.fence(1, {0: 40})
    assert r.view(0).committed(1) == -1  # not counted yet
    assert r.promote(0, 40) and r.view(0).committed(1) == 77
    assert r.logged.speaks_offsets(1) and not r.logged.speaks_offsets(2)
    r.hear([(WATERMARK, 1, (2000, 900))], after=2)  # a later report without an offset: an earlier release's worker
    assert not r.logged.speaks_offsets(1)
