"""The ingest tier's event-time merge of input partitions (streams/merge.py), without Kafka."""
from streams.worker.merge import Merge

A, B = ("events", 0), ("events", 1)


def fill(m: Merge, tp, times):
    for n, ms in enumerate(times):
        m.add(tp, ms, f"{tp[1]}-{n}", n, (tp[1], ms))


def test_partitions_read_far_apart_come_out_in_time_order():
    m = Merge(max_wait=0.5)
    fill(m, A, [1, 4, 9])
    fill(m, B, [2, 3, 10])
    assert [ms for _, ms in m.ready([A, B], lambda tp: False, 0.0)] == [1, 2, 3, 4, 9, 10]
    assert m.held == 0


def test_an_empty_partition_with_unread_data_holds_the_others():
    m = Merge(max_wait=0.5)
    fill(m, A, [5, 6])
    behind = {A: False, B: True}
    assert m.ready([A, B], behind.get, 0.0) == []
    assert m.first_offset(A) == 0  # nothing of A may be committed yet
    fill(m, B, [1])
    # B's 1 goes; B is empty and behind again: A waits
    assert m.ready([A, B], behind.get, 0.1) == [(1, 1)]
    behind[B] = False  # caught up: it holds nobody
    assert [ms for _, ms in m.ready([A, B], behind.get, 0.2)] == [5, 6]


def test_a_partition_that_never_delivers_holds_the_others_only_max_wait():
    m = Merge(max_wait=0.5)
    fill(m, A, [5])
    assert m.ready([A, B], lambda tp: tp == B, 10.0) == []
    assert m.ready([A, B], lambda tp: tp == B, 10.4) == []
    assert m.ready([A, B], lambda tp: tp == B, 10.5) == [(0, 5)]


def test_dropped_partitions_are_forgotten():
    m = Merge(max_wait=0.5)
    fill(m, A, [1, 2])
    fill(m, B, [3])
    m.drop([A])
    assert m.held == 1 and m.first_offset(A) is None
    assert m.ready([B], lambda tp: False, 0.0) == [(1, 3)]


def test_a_partition_that_looks_caught_up_is_confirmed_before_others_run_past_it_by_skew():
    m = Merge(max_wait=0.5, skew=100)
    fill(m, A, [1, 50])
    assert m.unconfirmed([A, B], lambda tp: False) == []  # (B gave nothing, but nothing is 100 past it)
    fill(m, A, [500])
    assert m.unconfirmed([A, B], lambda tp: False) == [B]
    assert m.unconfirmed([A, B], lambda tp: False) == []  # confirmed at 500: named again past 600
    fill(m, A, [601])
    assert m.unconfirmed([A, B], lambda tp: tp == B) == []  # known to be behind: the merge holds it anyway
    assert m.unconfirmed([A, B], lambda tp: False) == [B]
    m.ready([A, B], lambda tp: False, 0.0)
    fill(m, A, [900])
    m.ready([A, B], lambda tp: False, 0.0)
    assert m.unconfirmed([A, B], lambda tp: False) == []  # nothing held: nothing would go past B
