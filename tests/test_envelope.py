"""Envelopes: round trip, size limit, stable partitioning."""
from streams import envelope


def test_round_trip_keeps_order():
    items = [(f"acct-{i}", b'{"n":%d}' % i) for i in range(100)]
    (body,) = envelope.pack_all(items)
    assert list(envelope.unpack(body)) == items


def test_large_batches_are_split_under_the_limit_in_order():
    items = [(f"a{i}", b"x" * 300) for i in range(5000)]
    bodies = list(envelope.pack_all(items, max_bytes=64 * 1024))
    assert len(bodies) > 1 and all(len(b) <= 64 * 1024 for b in bodies)
    assert [x for b in bodies for x in envelope.unpack(b)] == items


def test_partition_is_stable_and_in_range():
    assert envelope.partition_of("acme", 4) == envelope.partition_of("acme", 4)
    assert {envelope.partition_of(f"a{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_unsafe_keys():
    assert not envelope.safe_key("a\tb") and not envelope.safe_key("a\nb") and not envelope.safe_key("")
