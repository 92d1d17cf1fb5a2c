"""Table recovery's bulk read: a changelog partition this process does not hold yet is read with
confluent-kafka (read_committed) straight into the table's store (Faust's memory store, or its
RocksDB store: that partition's database is emptied first); Faust's own recovery then reads only what
was written after that.

Faust (0.15.3) reads a changelog one record at a time through its event loop, at about 5,000 records
a second with the main thread at 100 % CPU: a SIGKILLed worker spent 15-30 s of every restart there
(chaos runs, session 9; `python -m benchmarks.recovery`). librdkafka fetches and filters aborted
transactions in C, and a record costs us a key decode and two dict writes.

The hook is the store's `persisted_offset(tp)`, which Faust's recovery asks once per changelog
partition at an assignment (`Recovery._add`), after the partition transactions' producers have
fenced the previous owner. The first such question of an assignment reads every active changelog
partition this process does not hold, in one pass. The answer is how far it was read (to the last
stable offset, or the last record read if it stopped early), and Faust goes on from there, exactly as
with a store that persisted it. A partition Faust revokes
(a rebalance, or our rollback: publish.Publisher.rollback) is read in full again next time. Standby
partitions are left to Faust (the worker runs none, streams/worker/app.py).

One path for both stores. RocksDB tables went through Faust's record-by-record recovery until
session 20, which can declare a changelog's end while records are still on their way to its queue
(docs/exactly-once.md): the SIGKILL test with rocksdb:// lost handoffs in CI (250 of 1,500) and under
a CPU hog here (202 of 1,500: users whose group-call link was in the changelog but not in the
recovered table). A RocksDB partition read here starts empty, so values that a SIGKILLed or
rolled-back transaction left in its files are gone too.

The read blocks the event loop (the store's question is not a coroutine); Faust's consumer thread
keeps the group membership meanwhile. It stops after STALL seconds without a record, and Faust's
recovery reads whatever is left.
"""
from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from faust.stores.memory import Store as MemoryStore
from faust.types import TP

from streams.worker import metrics
from streams.worker.eos import is_rocksdb

log = logging.getLogger("pql.worker")
STALL = 10.0  # seconds without a record before a bulk read gives up (a broker away)


class Restore:
    def __init__(self, app, conf: dict, tables: list):
        """`conf`: confluent-kafka settings (Settings.confluent()); `tables`: the Faust tables."""
        self.app = app
        self.conf = {**conf, "group.id": f"{app.conf.id}-restore", "enable.auto.commit": False,
                     "isolation.level": "read_committed", "enable.partition.eof": True, "fetch.wait.max.ms": 50,
                     "fetch.max.bytes": 64 * 1024 * 1024, "max.partition.fetch.bytes": 16 * 1024 * 1024}
        self.tables = {t.changelog_topic.get_topic_name(): t for t in tables}
        self.held: set[TP] = set()        # active changelog partitions in memory (bulk read, then Faust's recovery)
        self.answer: dict[TP, int] = {}   # what persisted_offset says next for a partition just read
        self.generation: int | None = None

    def install(self) -> None:
        for table in self.tables.values():
            store = table.data
            if isinstance(store, MemoryStore) or is_rocksdb(store):
                own = store.persisted_offset
                store.persisted_offset = lambda tp, own=own: self.persisted_offset(tp, own)
        recovery = self.app.tables.recovery
        revoke = recovery.revoke

        def revoked(tp: TP) -> None:
            self.held.discard(tp)
            self.answer.pop(tp, None)
            revoke(tp)

        recovery.revoke = revoked

    def persisted_offset(self, tp: TP, own=lambda tp: None) -> int | None:
        """What the store answers Faust's recovery: how far the bulk read just read `tp`, else the
        store's own answer (`own`: None for memory, the offset RocksDB last applied)."""
        generation = self.app.consumer_generation_id
        if generation != self.generation:  # the first question of an assignment
            self.generation = generation
            actives = {x for x in self.app.assignor.assigned_actives() if x.topic in self.tables}
            # A partition that was not active in between may have lost its keys (Faust's memory store
            # drops those of inactive partitions when a recovery completes): read it again.
            self.held &= actives
            if actives - self.held:
                self.read(actives - self.held)
        return self.answer.pop(tp) if tp in self.answer else own(tp)

    def read(self, tps: set[TP]) -> None:
        """Each partition from its start to its last stable offset into its table's memory store."""
        started = time.perf_counter()
        last: dict[TP, int] = {}  # offset of the last record read
        end: dict[TP, int] = {}   # where the partition ended (its last stable offset)
        pending, records = set(tps), 0
        for tp in tps:
            empty(self.tables[tp.topic].data, tp.partition)
        c = Consumer(self.conf)
        try:
            c.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in tps])
            heard = time.perf_counter()
            while pending and time.perf_counter() - heard < STALL:
                msgs = c.consume(10_000, timeout=0.1)  # returns at 10,000 messages or after 0.1 s
                if msgs:
                    heard = time.perf_counter()
                for m in msgs:
                    tp = TP(m.topic(), m.partition())
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(tp)
                            end[tp] = m.offset()
                            continue
                        raise KafkaException(err)
                    self._apply(self.tables[tp.topic], m)
                    last[tp] = m.offset()
                    records += 1
        except KafkaException as err:  # Faust's recovery reads what is left
            log.warning("bulk changelog read stopped (%s); table recovery reads the rest", err)
        finally:
            c.close()
        for tp in tps:
            self.held.add(tp)
            # Read to its end: what follows the last record is commit markers and aborted records,
            # so Faust, whose end is the last stable offset - 1, has nothing left to read there.
            done = max(last.get(tp, -1), end.get(tp, 0) - 1)
            if done >= 0:
                self.answer[tp] = done
            store = self.tables[tp.topic].data
            if is_rocksdb(store) and done >= 0:
                store.set_persisted_offset(tp, done)
        metrics.changelog_bulk.inc(records)
        log.info("bulk changelog read: %d records of %d partitions in %.1f s%s", records, len(tps),
                 time.perf_counter() - started, f" ({len(pending)} not to the end)" if pending else "")

    def _apply(self, table, m) -> None:
        """What Faust's store does with a changelog event (apply_changelog_batch)."""
        store, serializers = table.data, self.app.serializers
        if is_rocksdb(store):  # raw bytes, as Faust's RocksDB store keeps them
            db = store._db_for_partition(m.partition())
            if m.value() is None:
                db.delete(m.key())
            else:
                db.put(m.key(), m.value())
            return
        key = table._to_key(serializers.loads_key(table.key_type, m.key(), serializer=table.key_serializer))
        raw = m.value()
        if raw is None:
            store.data.pop(key, None)
            store._key_partition.pop(key, None)
            return
        store.data[key] = table._to_value(serializers.loads_value(table.value_type, raw, serializer=table.value_serializer))
        store._key_partition[key] = m.partition()


def empty(store, partition: int) -> None:
    """A RocksDB partition's database loses every key (its values and its persisted offset) before a
    bulk read fills it. (A memory store's values of a partition are dropped by Faust and by
    publish.Publisher.rollback, whenever it may have let go of them.)"""
    if not is_rocksdb(store):
        return
    db = store._db_for_partition(partition)
    for key in list(db.keys()):
        db.delete(key)
