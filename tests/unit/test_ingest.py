"""The ingest tier's self-clocking batches, without Kafka: how long `linger` keeps gathering."""
import asyncio
import time

from detectors.engine import Engine
from streams.config import Settings
from streams.worker.ingest import Ingest, Router
from streams.topics import Topics
from helpers import rules

TOPICS = Topics.of(Settings())


class Quiet:
    """A consumer with nothing more to read."""
    def consume(self, n, timeout=0):
        return []

    def close(self):
        pass


class Msg:
    def __init__(self, topic, partition, offset, value):
        self.t, self.p, self.o, self.v = topic, partition, offset, value

    def error(self):
        return None

    def topic(self):
        return self.t

    def partition(self):
        return self.p

    def offset(self):
        return self.o

    def value(self):
        return self.v

    def key(self):
        return None

    def headers(self):
        return None


def ingest(processed) -> Ingest:
    r = rules({"m": {"event": "X", "points": 60}})
    loop = Ingest({"bootstrap.servers": "127.0.0.1:1"}, "g", Router(Engine(r), TOPICS, 4), TOPICS, 5000,
                  linger_s=0.01, linger_max_s=0.4, processed=processed)
    loop.consumer.close()
    loop.consumer = Quiet()
    return loop


def gathering(loop: Ingest) -> float:
    started = time.monotonic()
    asyncio.run(loop.linger([object()]))
    return time.monotonic() - started


def test_an_idle_faust_tier_gets_the_batch_after_the_short_linger():
    loop = ingest(lambda: {0: 11})    # detect published everything up to offset 10
    loop._delivered(None, Msg(TOPICS.accounts, 0, 10, None))
    assert not loop.detect_busy()
    assert gathering(loop) < 0.2


def test_a_busy_faust_tier_makes_the_batch_wait_and_grow_up_to_the_max():
    loop = ingest(lambda: {0: 10})    # offset 10 sent, not yet published
    loop._delivered(None, Msg(TOPICS.accounts, 0, 10, None))
    assert loop.detect_busy()
    assert gathering(loop) >= 0.39


def test_the_batch_goes_as_soon_as_detect_catches_up():
    done = {0: 10}
    loop = ingest(lambda: done)
    loop._delivered(None, Msg(TOPICS.accounts, 0, 10, None))

    async def catch_up():
        await asyncio.sleep(0.1)
        done[0] = 11

    async def both():
        started = time.monotonic()
        await asyncio.gather(loop.linger([object()]), catch_up())
        return time.monotonic() - started

    took = asyncio.run(both())
    assert 0.1 <= took < 0.35


def test_partitions_another_worker_owns_never_hold_a_batch():
    loop = ingest(lambda: {})         # not ours: nothing to wait for
    loop._delivered(None, Msg(TOPICS.accounts, 2, 500, None))
    assert not loop.detect_busy()


def test_a_fatal_client_error_ends_the_loop_and_readiness():
    """librdkafka's fatal errors: the producer's end the loop with FatalClientError (/ready then says
    503); the consumer's (a fenced static member comes as a message error with code _FATAL whose
    fatal() is False) make the consumer anew, up to RECREATE times a minute, then end the loop."""
    import pytest
    from confluent_kafka import KafkaError

    from streams.worker.ingest import RECREATE, FatalClientError, fatal
    from streams.worker.monitor import ready

    assert fatal(KafkaError(KafkaError._FATAL)) and not fatal(KafkaError(KafkaError._TRANSPORT))
    loop = ingest({})
    first = loop.consumer
    for n in range(RECREATE):
        loop._consumer_error(KafkaError(KafkaError._FATAL, "Static consumer fenced"))
        asyncio.run(loop._check())
        assert loop.consumer is not first and loop.consumer_fatal is None and loop.alive()
    loop._consumer_error(KafkaError(KafkaError._FATAL, "Static consumer fenced"))
    with pytest.raises(FatalClientError, match="3 times within a minute"):
        asyncio.run(loop._check())
    loop = ingest({})
    assert loop.alive()
    loop._client_error(KafkaError(KafkaError._TRANSPORT))  # a broker down: transient
    assert loop.alive()
    loop._client_error(KafkaError(KafkaError._FATAL, "producer fenced"))
    assert not loop.alive()
    with pytest.raises(FatalClientError, match="fatal Kafka client error"):
        asyncio.run(loop._check())

    class App:  # what ready() reads of the Faust app
        class consumer:
            @staticmethod
            def assignment():
                return {("t", 0)}
        rebalancing = False

        class tables:
            class recovery:
                class completed:
                    @staticmethod
                    def is_set():
                        return True

    app = App()
    assert ready(app)
    app.pql_feed = type("Feed", (), {"alive": lambda self: loop.alive()})()
    assert not ready(app)


def test_a_message_of_a_partition_revoked_after_it_was_fetched_is_left_to_its_new_owner():
    """`linger` polls again, and polling runs the rebalance callbacks: a message fetched before its
    partition was revoked was handled anyway, put the partition back among ours, and the tier went on
    reporting it, held, for ever: every decision waited (cluster chaos seed 3, session 11)."""
    from confluent_kafka import TopicPartition

    loop = ingest(lambda: {})
    loop.producer = type("P", (), {"produce": lambda *a, **k: None, "flush": lambda self, t=0: 0,
                                   "poll": lambda self, t=0: 0})()
    loop.consumer = type("C", (), {"commit": lambda *a, **k: None, "committed": lambda self, tps, timeout: tps,
                                   "get_watermark_offsets": lambda self, tp, timeout=0, cached=False: (0, 100)})()
    events = TOPICS.events[0]
    mine, theirs = TopicPartition(events, 0, 5), TopicPartition(events, 1, 5)
    loop._assigned(loop.consumer, [mine, theirs])
    fetched = [Msg(events, p, 7, b'{"type":"track","event":"X","userId":"u","messageId":"m%d",'
                                  b'"timestamp":"2026-12-01T00:00:00Z","context":{"groupId":"a"}}' % p) for p in (0, 1)]
    loop._revoked(loop.consumer, [theirs])
    asyncio.run(loop.handle(fetched))
    assert (events, 1) not in loop.read and (events, 0) in loop.read
    told = []
    loop._produce = lambda topic, value, **kw: told.append((topic, value))
    assert [(kind, at) for kind, at, _ in loop.report(1000)] == [("i", 0)]  # product.events partition 0 only
    reported = {line.split(b"\t")[0] for topic, body in told for line in body.split(b"\n")}
    assert reported == {b"\x1ei0"} and {topic for topic, _ in told} == {TOPICS.progress}


class Stale(Quiet):
    """A consumer whose cached ends are as of a fetch before a backlog was published."""
    def __init__(self, ends):
        self.fresh, self.asked = ends, []

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if cached:
            return 0, 0
        self.asked.append(tp.partition)
        return 0, self.fresh[tp.partition]

    def commit(self, offsets, asynchronous=True):
        pass


def test_a_partition_that_looks_caught_up_is_asked_again_before_the_others_run_weeks_ahead():
    """A backlog published while the worker runs: partition 0's fetch has it, partition 1's cached
    end says nothing is there. Its end from the broker holds 0's events back (merge.py)."""
    import json

    class Sent:
        def flush(self, timeout=0):
            return 0

    loop = ingest(lambda: {})
    loop.consumer = Stale({0: 100, 1: 100})
    loop.producer = Sent()
    loop._produce = lambda *a, **kw: None
    owned = [(TOPICS.events[0], 0), (TOPICS.events[0], 1)]
    loop.owned.update(owned)
    for tp in owned:
        loop.read[tp] = -1
    loop._ends()
    assert not loop._behind(owned[1])
    msgs = [Msg(TOPICS.events[0], 0, n, json.dumps({
        "type": "track", "event": "X", "messageId": f"m{n}", "userId": "u", "context": {"groupId": "a"},
        "timestamp": f"2026-10-{1 + n:02d}T00:00:00Z"}).encode()) for n in range(20)]  # 20 days
    asyncio.run(loop.handle(msgs))
    assert loop.consumer.asked == [1]
    assert loop.merge.held == 20  # held: partition 1 has unread data
    assert loop._behind(owned[1])


def test_each_cross_partition_link_is_told_to_its_account_with_the_last_offset_acked_on_its_partition():
    from streams.worker import envelope

    loop = ingest(dict)
    loop._delivered(None, Msg(TOPICS.accounts, 2, 40, None))
    loop._delivered(None, Msg(TOPICS.accounts, 2, 41, None))  # the batch's last envelope on partition 2
    sent = []
    loop._produce = lambda topic, value, **kw: sent.append((topic, kw["partition"], value))
    loop._linked([(1, "acme", "g-1", "u", 2), (1, "acme", "g-1", "a", 2), (3, "beta", "g-2", "u", 2)])
    assert [(t, p) for t, p, _ in sent] == [(TOPICS.accounts, 1), (TOPICS.accounts, 3)]
    lines = {p: [(k, key, envelope.decode(k, raw)) for k, key, raw in envelope.unpack(v)] for _, p, v in sent}
    assert lines[1] == [("k", "acme", ("g-1", "u", 2, 41)), ("k", "acme", ("g-1", "a", 2, 41))]
    assert lines[3] == [("k", "beta", ("g-2", "u", 2, 41))]
