"""Every workaround of Faust and aiokafka internals that exactly-once relies on, with the reason.

Checked against faust-streaming 0.15.3 and aiokafka 0.14.0 (pinned in pyproject.toml). Each relies
on internals; `INTERNALS` lists them and `tests/test_eos_internals.py` fails, naming the attribute,
when an upgrade removes or renames one. Elsewhere in streams/app.py: `tid` (the TransactionManager's
transactional-id format) and `on_assigned` (a fresh producer per owned partition on every
assignment), which use `app.producer.{stop,begin,maybe_begin}_transaction`.
"""
from __future__ import annotations

import asyncio
import logging
import time

from streams import metrics

log = logging.getLogger("pql.worker")

CHECKED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}

# (module, attribute path) the workarounds below and streams/app.py use
INTERNALS = [
    ("faust.transport.consumer", "Consumer.ack"),            # guard_skips wraps it
    ("faust.transport.consumer", "Consumer.commit"),         # guard_commits wraps it
    ("faust.transport.consumer", "Consumer.seek"),           # reread_skipped
    ("faust.transport.consumer", "Consumer.perform_seek"),   # what seek_uncommitted_to_start corrects
    ("faust.transport.drivers.aiokafka", "Producer._settings_extra"),  # short_retries
    ("faust.transport.producer", "Producer"),
    ("faust.sensors.monitor", "Monitor"),
    ("aiokafka", "AIOKafkaConsumer.seek_to_committed"),      # seek_uncommitted_to_start wraps it
    ("aiokafka", "AIOKafkaConsumer.seek_to_beginning"),
    ("faust.transport.drivers.aiokafka", "Producer.begin_transaction"),     # app.py on_assigned
    ("faust.transport.drivers.aiokafka", "Producer.stop_transaction"),
    ("faust.transport.drivers.aiokafka", "Producer.maybe_begin_transaction"),  # app.py send_tx
]


def guard_commits(consumer, lock: asyncio.Lock) -> None:
    """Make Faust's commits (timer, rebalance, shutdown) wait while `detect` is publishing."""
    if getattr(consumer, "_pql_guarded", False):
        return
    original = consumer.commit

    async def commit(*args, **kwargs):
        async with lock:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                metrics.commit_seconds.observe(time.perf_counter() - started)

    consumer.commit = commit
    consumer._pql_guarded = True


def guard_skips(consumer, topic: str) -> set:
    """Only `detect` acks an envelope. Returns the set of (tp, offset) it is about to ack.

    Faust (0.15.3, streams.py `skipped_value`) drops a delivered message when flow control is off or
    its generation is old, and acks it: the commit then passes an envelope nobody processed. Records
    fetched between a recovery's seek and the flow's resume met this (the SIGKILL test lost 16 to 250
    handoffs of 1,500 a run). Here any other ack of `topic` is refused and remembered in
    `consumer._pql_skipped` ({tp: earliest offset}); `reread_skipped` reads those partitions again.
    Processing an envelope twice is harmless: every line is deduplicated (messageId, link, mark).
    """
    if getattr(consumer, "_pql_done", None) is not None:
        return consumer._pql_done
    original = consumer.ack
    done: set = set()
    skipped: dict = {}

    def ack(message) -> bool:
        if message.topic == topic:
            key = (message.tp, message.offset)
            if key not in done:
                skipped[message.tp] = min(skipped.get(message.tp, message.offset), message.offset)
                return False
            done.discard(key)
        return original(message)

    consumer.ack = ack
    consumer._pql_done, consumer._pql_skipped = done, skipped
    return done


async def reread_skipped(app) -> None:
    """Seek each partition with a refused ack back to it, once the flow runs (see guard_skips)."""
    consumer = app.consumer
    skipped = getattr(consumer, "_pql_skipped", None)
    if not skipped or not app.flow_control.is_active():
        return
    owned = consumer.assignment()
    for tp, offset in list(skipped.items()):
        del skipped[tp]
        if tp in owned:
            log.warning("reading partition %d again from offset %d (Faust skipped an envelope)", tp.partition, offset)
            metrics.rereads.inc()
            await consumer.seek(tp, offset)


def seek_uncommitted_to_start() -> None:
    """A partition with no committed offset is read from its start after every rebalance.

    aiokafka (0.14) `seek_to_committed` leaves a partition whose committed offset is none (or 0)
    where its fetcher is. Faust drops the rest of a fetched batch when a rebalance starts (getmany
    `break` on a new generation) and relies on that seek to read it again: on a new group, envelopes
    fetched in the first generation were never read (the two-worker test lost 188 of 1,200 handoffs).
    With nothing committed, nothing was processed: start over (`auto_offset_reset=earliest`).
    """
    from aiokafka import AIOKafkaConsumer

    original = AIOKafkaConsumer.seek_to_committed
    if getattr(original, "_pql", False):
        return

    async def seek_to_committed(self, *partitions):
        committed = await original(self, *partitions)
        fresh = [tp for tp, offset in committed.items() if not offset]
        if fresh:
            await self.seek_to_beginning(*fresh)
        return committed

    seek_to_committed._pql = True
    AIOKafkaConsumer.seek_to_committed = seek_to_committed


def short_retries(producer) -> None:
    """Retry sends after 20 ms instead of aiokafka's 100 ms.

    Right after a commit, Kafka (4.x, to a pre-KIP-890 client such as aiokafka) refuses a send to a
    partition whose commit markers it is still writing, with the retriable NOT_ENOUGH_REPLICAS; the
    retry then waits `retry_backoff_ms`, and so does the next commit, which flushes that send. 20 ms
    is what aiokafka itself uses for the same race when adding partitions (KAFKA-5477). Faust has
    no setting for it: every producer it makes (one per partition transaction) gets it here.
    """
    extra = producer._settings_extra
    producer._settings_extra = lambda: {**extra(), "retry_backoff_ms": 20}
