"""The barrier's reports (streams/worker/barrier.py): a report counts for a partition only once it
has processed its log up to the report's fence, per partition, and a batch costs O(sources)."""
from streams.worker.barrier import EMPTY, Heard, Reports, lowest
from streams.worker.envelope import ANSWERS, IDLE, INPUT, WATERMARK


def test_a_report_counts_once_the_partition_has_read_up_to_its_fence():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], {0: 40, 2: 7})
    assert r.view(0) is EMPTY
    assert not r.promote(0, 39)  # a line partition 1 wrote before its report may still be at offset 39
    assert r.view(0) is EMPTY
    assert r.promote(0, 40) and r.view(0).told == {1: (1000, 500)}
    assert r.view(2) is EMPTY  # what partition 0 counts frees no other partition


def test_a_partition_counts_the_newest_batch_it_has_passed():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], {0: 10})
    r.hear([(WATERMARK, 1, (2000, 1500)), (INPUT, 3, (2000, IDLE))], {0: 20})
    r.hear([(WATERMARK, 1, (3000, 2500))], {0: 30})
    assert r.promote(0, 25) and r.view(0).told == {1: (2000, 1500)} and r.view(0).inputs == {3: (2000, IDLE)}
    assert not r.promote(0, 25)  # nothing newer passed
    assert r.promote(0, 31) and r.view(0).told == {1: (3000, 2500)}
    assert r.view(0).inputs == {3: (2000, IDLE)}  # batches are cumulative


def test_a_partition_not_owned_when_a_batch_came_has_no_fence_in_it():
    r = Reports()
    r.hear([(WATERMARK, 1, (1000, 500))], {0: 10})
    assert not r.promote(5, 10**9)


def test_an_older_report_never_replaces_a_newer_one():
    heard = EMPTY.merged([(ANSWERS, 0, (2000, 900))]).merged([(ANSWERS, 0, (1000, IDLE))])
    assert heard.answers == {0: (2000, 900)}


def test_a_partition_does_not_wait_for_itself():
    heard = Heard(told={0: (1000, 100), 1: (1000, 300), 2: (5000, IDLE)})
    assert heard.lowest_told(0) == 300 and heard.lowest_told(1) == 100 and heard.lowest_told(2) == 100
    assert lowest([(5000, IDLE)]) == 5000  # idle counts as its tick


def test_what_is_kept_is_bounded():
    r = Reports(keep=4)
    for n in range(100):
        r.hear([(WATERMARK, 1, (n, n))], {0: n})
    assert len(r.batches) == 4
    assert r.promote(0, 99) and r.view(0).told == {1: (99, 99)}
