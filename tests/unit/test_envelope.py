"""Envelopes: round trip, size limit, stable partitioning."""
import json

from detectors.identity import LINK, MARK
from streams.worker import envelope


def test_round_trip_keeps_order():
    items = [(f"acct-{i}", b'{"n":%d}' % i) for i in range(100)]
    (body,) = envelope.pack_all(items)
    assert list(envelope.unpack(body)) == [("e", k, v) for k, v in items]


def test_large_batches_are_split_under_the_limit_in_order():
    items = [(f"a{i}", b"x" * 300) for i in range(5000)]
    bodies = list(envelope.pack_all(items, max_bytes=64 * 1024))
    assert len(bodies) > 1 and all(len(b) <= 64 * 1024 for b in bodies)
    assert [(k, v) for b in bodies for _, k, v in envelope.unpack(b)] == items


def test_partition_is_stable_and_in_range():
    assert envelope.partition_of("acme", 4) == envelope.partition_of("acme", 4)
    assert {envelope.partition_of(f"a{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def test_unsafe_keys():
    assert not envelope.safe_key("a\tb") and not envelope.safe_key("a\nb") and not envelope.safe_key("")
    assert not envelope.safe_key("\x1era") and envelope.safe_key("acme é")


def test_lines_of_every_kind_round_trip():
    items = [("acme", b'{"e":1}'), (envelope.marked(envelope.RESPONSE, "acme"), b'{"r":1}')]
    (body,) = envelope.pack_all(items)
    body += b"\n" + envelope.tick(1795428000000)
    assert list(envelope.unpack(body)) == [("e", "acme", b'{"e":1}'), ("r", "acme", b'{"r":1}'),
                                           ("t", "", b"1795428000000")]


def test_link_and_mark_payloads_are_compact_json():
    """Built by hand for speed: the bytes json.dumps writes, and decode reads them back."""
    for account, call, slot, ms in [("acct-1", "m-1", "u", 1794795640588), ('a"b\\c', "é\u2028\x7f☃", "a", 0),
                                    ("x\ty", "\U0001f600", "u", -5)]:
        _, link = envelope.encode(LINK, "u:k", (account, ms, [call, slot]))
        assert link == json.dumps([account, ms, [call, slot]], separators=(",", ":")).encode()
        assert envelope.decode(LINK, link) == (account, ms, [call, slot])
        _, moved = envelope.encode(LINK, "u:k", (account, ms, None))
        assert moved == json.dumps([account, ms, None], separators=(",", ":")).encode()
        _, mark = envelope.encode(MARK, account, (call, slot, ms))
        assert mark == json.dumps([call, slot, ms], separators=(",", ":")).encode()
        assert envelope.decode(MARK, mark) == (call, slot, ms)
        _, flagged = envelope.encode(LINK, "u:k", (account, ms, [call, slot, 1]))
        assert envelope.decode(LINK, flagged) == (account, ms, [call, slot, 1])
        _, linked = envelope.encode(envelope.LINKED, account, (call, slot, 7, 12345))
        assert linked == json.dumps([call, slot, 7, 12345], separators=(",", ":")).encode()
        assert envelope.decode(envelope.LINKED, linked) == (call, slot, 7, 12345)
