"""Exactly-once: partition transactions, and every workaround of Faust and aiokafka internals it
relies on, with the reason.

Faust (processing_guarantee="exactly_once") gives each source partition p a transactional producer
and commits p's input offsets in its transaction. `Transactions` sends `detect`'s writes for an
envelope of p into that transaction and holds commits off meanwhile (docs/exactly-once.md).

Checked against faust-streaming 0.15.3 and aiokafka 0.14.0 (pinned in pyproject.toml). `INTERNALS`
lists the internals used here and `tests/unit/test_eos_internals.py` fails, naming the attribute,
when an upgrade removes or renames one.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from aiokafka.errors import IllegalOperation, KafkaError, ProducerFenced
from faust.exceptions import ProducerSendError
from faust.types import TP

from streams.worker import metrics

log = logging.getLogger("pql.worker")

CHECKED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}

# (module, attribute path) used below
INTERNALS = [
    ("faust.transport.consumer", "Consumer.ack"),            # guard_skips wraps it
    ("faust.transport.consumer", "Consumer.commit"),         # guard_commits wraps it
    ("faust.transport.consumer", "Consumer._commit_handler.fun"),  # its timer calls commit() with no arguments
    ("faust.transport.consumer", "Consumer.seek"),           # reread_skipped
    ("faust.transport.consumer", "Consumer.perform_seek"),   # what seek_uncommitted_to_start corrects
    ("faust.transport.drivers.aiokafka", "Producer._settings_extra"),  # short_retries, rare_metadata_refresh
    ("faust.transport.producer", "Producer"),
    ("faust.sensors.monitor", "Monitor"),
    ("aiokafka", "AIOKafkaConsumer.seek_to_committed"),      # seek_uncommitted_to_start wraps it
    ("aiokafka", "AIOKafkaConsumer.seek_to_beginning"),
    ("faust.transport.drivers.aiokafka", "Producer.begin_transaction"),        # Transactions.on_assigned
    ("faust.transport.drivers.aiokafka", "Producer.stop_transaction"),
    ("faust.transport.drivers.aiokafka", "Producer.maybe_begin_transaction"),  # Transactions.send_all
    ("faust.assignor.partition_assignor", "PartitionAssignor.group_for_topic"),  # Transactions.tid, remembered_topic_groups
    ("faust.assignor.partition_assignor", "PartitionAssignor.on_assignment"),    # remembered_topic_groups
    ("faust.transport.consumer", "TransactionManager.on_rebalance"),             # what remembered_topic_groups guards
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread.verify_event_path"),  # quiet_livelock_check
    ("faust.transport.consumer", "Consumer.verify_all_partitions_active"),  # rare_livelock_check
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._ensure_consumer"),
    ("aiokafka.consumer.subscription_state", "TopicPartitionState.has_valid_position"),
    ("faust.transport.drivers.aiokafka", "Producer._transaction_producers"),  # Transactions.uncommitted, send_all
    ("faust.transport.drivers.aiokafka", "Producer._trn_locks"),              # Transactions.send_all
    ("aiokafka", "AIOKafkaProducer.create_batch"),
    ("aiokafka", "AIOKafkaProducer.send_batch"),
    ("aiokafka.producer.sender", "Sender._find_coordinator"),  # coordinator_lookup_survives_a_closed_connection
    ("aiokafka.client", "AIOKafkaClient.bootstrap"),           # bootstrap_waits_for_the_broker
    ("aiokafka.producer.transaction_manager", "TransactionManager.is_in_transaction"),
    ("faust.tables.recovery", "Recovery.revoke"),                                # publish.Publisher.rollback
    ("faust.stores.rocksdb", "Store.offset_key"),                                # forget_persisted_offsets
    ("faust.stores.rocksdb", "Store._db_for_partition"),                         # restore: the bulk read
    ("faust.stores.rocksdb", "Store.set_persisted_offset"),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._highwaters"),  # broker_highwaters
    ("aiokafka", "AIOKafkaConsumer.end_offsets"),
    ("faust.transport.consumer", "Consumer._add_gap"),       # exclusive_gaps
    ("faust.transport.consumer", "Consumer.getmany"),        # no_batch_across_seeks
    ("faust.worker", "Worker._on_sigterm"),                  # stop_within
    ("faust.worker", "Worker._on_sigint"),
    ("faust.transport.drivers.aiokafka", "Transport._really_create_topic"),  # topic_creation_waits_for_a_node
    ("aiokafka.consumer.subscription_state", "TopicPartitionState.position"),  # read_to
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._fetch_records"),  # noted_fetches
    ("aiokafka", "AIOKafkaConsumer.assignment"),
    ("faust.transport.drivers.aiokafka", "Producer.commit_transactions"),  # concurrent_commits replaces it
    ("faust.transport.drivers.aiokafka", "logger"),
    ("aiokafka", "AIOKafkaProducer.send_offsets_to_transaction"),
    ("aiokafka", "AIOKafkaProducer.commit_transaction"),
    ("aiokafka", "AIOKafkaProducer.begin_transaction"),
    ("faust.app.base", "App.on_rebalance_start"),            # quick_fetches_while_rebalancing
    ("faust.app.base", "App.on_rebalance_end"),
    ("mode.worker", "Worker._sentinel_task"),                # no_idle_second
    ("aiokafka.client", "AIOKafkaClient.set_topics"),        # Transactions.know_outputs (and its `_topics`)
    ("aiokafka.cluster", "ClusterMetadata.update_metadata"),  # adopt_metadata: the attributes it replaces
    ("faust.transport.consumer", "TransactionManager._start_transactions"),  # concurrent_starts
]
# attributes Faust's Consumer sets on its instances, used above (checked in the same test file)
CONSUMER_ATTRIBUTES = ["_gap", "_read_offset", "_committed_offset"]
LIVELOCK_EVERY = 10.0  # s between Faust's livelock checks of every partition (quiet_livelock_check)
HANDOFF_COMMIT_DELAY = 0.005  # handoffs close together share one early commit
CATCHUP_RECORDS = 500  # records of the owned <app>-accounts partitions not processed yet: catching up
BOOTSTRAP_PATIENCE = 120.0  # seconds a starting client waits for a broker that was there a moment ago
REBALANCE_FETCH_WAIT_MS = 100  # longest wait of a fetch while partitions are assigned and recovered
PRODUCER_METADATA_MAX_AGE_MS = 3_600_000  # rare_metadata_refresh
STARTS_AT_ONCE = 32  # transactional producers started side by side (concurrent_starts, on_assigned)


def install(app, source: str) -> None:
    """The workarounds that need no running consumer (the others start with `detect`); `source`:
    the input topic of the partition transactions (<app>-accounts)."""
    short_retries(app.producer)
    rare_metadata_refresh(app.producer)
    concurrent_commits(app.producer)
    concurrent_starts()
    seek_uncommitted_to_start()
    quiet_livelock_check()
    rare_livelock_check()
    broker_highwaters()
    exclusive_gaps()
    no_batch_across_seeks(source)
    noted_fetches(source)
    remembered_topic_groups()
    coordinator_lookup_survives_a_closed_connection()
    quick_fetches_while_rebalancing(app)
    no_idle_second()
    bootstrap_waits_for_the_broker()
    topic_creation_waits_for_a_node()


def bootstrap_waits_for_the_broker() -> None:
    """A starting Faust client waits for a broker that is restarting instead of exiting.

    `pql worker` checks the brokers and credentials before it starts (streams/connect.py), so a
    wrong address or password still fails fast. But aiokafka (0.14, `AIOKafkaClient.bootstrap`)
    gives up at the first refused connection, and a worker restarted while the broker restarts
    exited with "Unable to bootstrap" (chaos seed 2, session 9: a SIGKILL and the broker restart
    in the same second). Bootstrap is retried for BOOTSTRAP_PATIENCE seconds.
    """
    from aiokafka.client import AIOKafkaClient

    bootstrap = AIOKafkaClient.bootstrap
    if getattr(bootstrap, "_pql", False):
        return

    async def patient_bootstrap(self):
        return await patiently(lambda: bootstrap(self), BOOTSTRAP_PATIENCE)

    patient_bootstrap._pql = True
    AIOKafkaClient.bootstrap = patient_bootstrap


def topic_creation_waits_for_a_node() -> None:
    """A starting worker waits for a cluster node that is down instead of exiting.

    Faust (0.15.3, `Transport._really_create_topic`, run at start for each topic it declares even
    when it exists) asks the first broker of its metadata for the controller, then sends
    CreateTopics there; either node may be one that died a moment ago and is still listed. aiokafka
    then raises NodeNotReadyError and the worker exited 1 (cluster chaos seed 1, session 11: a worker
    restarted while node 3 was down). The creation is retried with fresh metadata for
    BOOTSTRAP_PATIENCE seconds.
    """
    from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, RequestTimedOutError
    from faust.transport.drivers.aiokafka import Transport

    create = Transport._really_create_topic
    if getattr(create, "_pql", False):
        return

    async def _really_create_topic(self, owner, client, topic, *args, **kwargs):
        async def once():
            try:
                return await create(self, owner, client, topic, *args, **kwargs)
            except (NodeNotReadyError, RequestTimedOutError) as err:  # (a refused connection is one)
                await client.force_metadata_update()
                raise KafkaConnectionError(f"creating topic {topic}: {err}") from err
        return await patiently(once, BOOTSTRAP_PATIENCE)

    _really_create_topic._pql = True
    Transport._really_create_topic = _really_create_topic


async def patiently(call, patience: float, pause: float = 1.0):
    """`await call()`, again after `pause` s while it fails to connect, for up to `patience` s."""
    from aiokafka.errors import KafkaConnectionError

    deadline = time.monotonic() + patience
    while True:
        try:
            return await call()
        except KafkaConnectionError as err:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("Kafka unreachable (%s); retrying in %.0f s", err, pause)
            await asyncio.sleep(pause)


def no_idle_second() -> None:
    """A worker does not run its loop a last second after every task has ended (mode's
    `Worker._sentinel_task`, 0.15.3): a second of every stop, rolling restarts included.

    (Faust's table manager also sleeps a second before table recovery starts, `TableManager.on_start`.
    Without it, a worker restarted under its PQL_INSTANCE_ID rejoined before its changelog topics
    were in its subscription, was assigned no changelog partition, "recovered" nothing and decided
    on empty tables: chaos at 64 partitions, seed 2, session 20, 62 of 1,084 handoffs. It stays.)
    """
    from mode.worker import Worker

    if getattr(Worker._sentinel_task, "_pql", False):
        return

    async def _sentinel_task(self) -> None:
        await asyncio.sleep(0.05)  # callbacks already scheduled still run

    _sentinel_task._pql = True
    _sentinel_task.replaced = Worker._sentinel_task  # (checked in tests)
    Worker._sentinel_task = _sentinel_task


def quick_fetches_while_rebalancing(app) -> None:
    """From a rebalance's start to "Worker ready" the consumer's fetches wait at most
    REBALANCE_FETCH_WAIT_MS for data, then Faust's 1.5 s again.

    A broker answers the requests of one connection in order, and Faust (0.15.3) makes its consumer
    with fetch_max_wait_ms=1500: each offsets request of table recovery (the changelogs' ends, their
    starts) and the seek after it waited behind an empty fetch's 1.5 s. A worker took 4.6 s from
    "Recovery: Starting" to "Worker ready" with nothing to recover, 1.1 s with 100 ms (session 20,
    2026-12-07). Outside rebalances the long wait is kept: an idle worker's fetches cost CPU.
    """
    start, end = app.on_rebalance_start, app.on_rebalance_end
    if getattr(start, "_pql", False):
        return

    def on_rebalance_start() -> None:
        start()
        fetch_wait(app, REBALANCE_FETCH_WAIT_MS)

    def on_rebalance_end() -> None:
        end()
        fetch_wait(app, FAUST_FETCH_WAIT_MS)

    on_rebalance_start._pql = True
    app.on_rebalance_start, app.on_rebalance_end = on_rebalance_start, on_rebalance_end


def tables_follow_sources(app, source: str, changelogs: list[str]) -> None:
    """At each rebalance's end ("Worker ready"), every partition of `source` (<app>-accounts) this
    worker was assigned must come with the same partition of each table's changelog: its tables were
    recovered from them. If one does not, the worker logs CRITICAL and exits (70) before it decides
    anything on empty tables; a supervisor restarts it.

    Faust assigns them together; session 20 removed Faust's 1 s before table recovery and a worker
    restarted under its PQL_INSTANCE_ID was assigned no changelog partition at all, recovered
    nothing and went on (chaos seed 2 at 64 partitions: 62 of 1,084 handoffs). Nothing noticed.
    """
    end = app.on_rebalance_end

    def on_rebalance_end() -> None:
        end()
        assigned = app.consumer.assignment()
        missing = sorted({(t, tp.partition) for tp in assigned if tp.topic == source
                          for t in changelogs if TP(t, tp.partition) not in assigned})
        if missing:
            log.critical("assigned %s partitions without their tables' changelog partitions (%s); exiting (code 70) "
                         "rather than decide on tables not recovered", source,
                         ", ".join(f"{t} {p}" for t, p in missing[:6]) + (" ..." if len(missing) > 6 else ""))
            logging.shutdown()
            os._exit(70)

    app.on_rebalance_end = on_rebalance_end


FAUST_FETCH_WAIT_MS = 1500  # what faust.transport.drivers.aiokafka gives its worker consumer
QUIET_FETCH_WAIT_MS = 5000  # while the worker's ticks are quiet (streams/worker/progress.py `_quiet`)


def fetch_wait(app, ms: int) -> None:
    """The longest wait of the worker consumer's next fetches (aiokafka reads it per request).

    A fetch returns as soon as there is something to read (a transaction's commit included), so the
    wait costs no latency; only a request behind the one in flight on its connection waits for it (a
    rebalance's ListOffsets: `quick_fetches_while_rebalancing`). Every empty answer costs Python work
    per assigned partition (about 70 us each at 256 partitions): while its ticks are quiet, the
    worker waits QUIET_FETCH_WAIT_MS (idle at 256 partitions 5.3 -> 3.8 % of a core, session 23),
    then Faust's FAUST_FETCH_WAIT_MS again."""
    consumer = getattr(getattr(app.consumer, "_thread", None), "_consumer", None)
    if consumer is None:
        return
    consumer._fetch_max_wait_ms = ms  # (read by start(), which makes the fetcher)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None:
        fetcher._fetch_max_wait_ms = ms
        # aiokafka's fetch loop also wakes every `_fetcher_timeout` (0.2 s) with nothing to do, and
        # looks at every assigned partition each time (the changelogs' too): 1,281 at 256 partitions,
        # about 1 % of a core idle (session 23). Everything it waits for wakes it anyway (a fetch
        # answered, records consumed, a seek, a resume, an assignment): the timeout is a fallback.
        fetcher._fetcher_timeout = ms / 1000


def coordinator_lookup_survives_a_closed_connection() -> None:
    """aiokafka's producer sender retries a transaction-coordinator lookup that finds no coordinator,
    but a connection closed under the lookup (a broker restart) is fatal there: the sender routine
    dies ("Unexpected error in sender routine"), the transaction with it, and `detect` had to exit
    for a clean restart (chaos seed 3, session 8). A closed connection is retried like the others."""
    from aiokafka.errors import KafkaConnectionError
    from aiokafka.producer.sender import Sender

    lookup = Sender._find_coordinator
    if getattr(lookup, "_pql", False):
        return

    async def _find_coordinator(self, coordinator_type, coordinator_key):
        while True:
            try:
                return await lookup(self, coordinator_type, coordinator_key)
            except KafkaError as err:
                if not isinstance(err.__cause__, KafkaConnectionError):
                    raise
                log.info("transaction coordinator lookup: connection closed (%s); retrying", err.__cause__)
                await self.client.force_metadata_update()
                await asyncio.sleep(self._retry_backoff)

    _find_coordinator._pql = True
    Sender._find_coordinator = _find_coordinator


def quiet_livelock_check() -> None:
    """Faust's livelock check skips a partition whose position is being reset.

    Faust (0.15.3, `verify_event_path`, every 2.5 commit intervals outside rebalances) reads
    aiokafka's `TopicPartitionState.position`, which asserts that the position is known; right after
    a seek to the beginning (`seek_uncommitted_to_start`) it is not yet, and the AssertionError
    crashes the consumer and the worker (seen once in the two-worker test). Such a partition is
    being read from its start: nothing to check yet.
    """
    from aiokafka.structs import TopicPartition
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    original = AIOKafkaConsumerThread.verify_event_path
    if getattr(original, "_pql", False):
        return

    def verify_event_path(self, now, tp):
        assignment = self._ensure_consumer()._fetcher._subscriptions.subscription.assignment
        state = assignment.state_value(TopicPartition(tp.topic, tp.partition)) if assignment else None
        if state is not None and not state.has_valid_position:
            return None
        return original(self, now, tp)

    verify_event_path._pql = True
    AIOKafkaConsumerThread.verify_event_path = verify_event_path


def rare_livelock_check(cls=None) -> None:
    """Faust's livelock check runs every LIVELOCK_EVERY seconds, not four times a second.

    It walked every assigned partition every 2.5 commit intervals (`verify_all_partitions_active`):
    the largest share of an idle 64-partition worker's Python time (issue 25). Its warnings come
    after minutes (`broker_commit_livelock_soft_timeout`, 300 s): a check every few seconds says the
    same.
    """
    from faust.transport.consumer import Consumer

    cls = cls or Consumer
    verify_all = cls.verify_all_partitions_active
    if getattr(verify_all, "_pql", False):
        return

    async def verify_all_partitions_active(self) -> None:
        now = time.monotonic()
        if now - getattr(self, "_pql_verified", float("-inf")) >= LIVELOCK_EVERY:
            self._pql_verified = now
            await verify_all(self)

    verify_all_partitions_active._pql = True
    cls.verify_all_partitions_active = verify_all_partitions_active


def broker_highwaters() -> None:
    """Faust's recovery asks the broker for the changelogs' ends, never a fetch's leftovers.

    With exactly-once, Faust (0.15.3, `AIOKafkaConsumerThread._highwaters`) takes a changelog
    partition's end from aiokafka's `last_stable_offset`, which is known only once that partition was
    fetched under the current assignment: after a rebalance it is None, Faust makes it -1, and a
    worker that had read that changelog before (its memory store kept the offsets) raises
    `ConsistencyError` ("persisted offset ... is higher than ... highwater (4 > -1)") and exits. The
    chaos run met it after every broker restart. `end_offsets` asks the broker (ListOffsets with the
    consumer's read_committed isolation: the last stable offset), which is what Faust meant.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    if getattr(AIOKafkaConsumerThread._highwaters, "_pql", False):
        return

    async def _highwaters(self, partitions):
        return await self._ensure_consumer().end_offsets(partitions)

    _highwaters._pql = True
    AIOKafkaConsumerThread._highwaters = _highwaters


def forget_persisted_offsets(store, partitions: set[int]) -> None:
    """A RocksDB store forgets how far it had read these partitions' changelogs (our rollback:
    publish.Publisher.rollback drops their values).

    Faust's RocksDB store (0.15.3) keeps the offset of the last changelog record it applied in each
    partition's database, and recovery reads on from there (`Recovery._add` asks `persisted_offset`).
    After a rollback dropped a partition's values, that read skipped every value written before the
    offset: the state of those accounts was gone (SIGKILL test with rocksdb://: 775 of 1,500 handoffs
    lost once, session 18). Without the offset, recovery reads the partition's changelog from its start,
    as with the memory store (streams/worker/restore.py). Other stores: nothing to do.
    """
    if not is_rocksdb(store):
        return
    for p in partitions:
        db = store._db_for_partition(p)
        if db.get(store.offset_key) is not None:
            del db[store.offset_key]


def is_rocksdb(store) -> bool:
    """Faust's RocksDB store (its per-partition databases and offset key, used here and by restore.py)."""
    return hasattr(store, "_db_for_partition") and hasattr(store, "offset_key")


def remembered_topic_groups(cls=None) -> None:
    """The assignor still knows the topic groups of partitions an assignment took away.

    Faust (0.15.3, `TransactionManager.on_rebalance`) looks up the group of every *revoked* partition
    in the topic groups of the *new* assignment (`PartitionAssignor.group_for_topic`). After a broker
    restart the chaos run met an empty assignment (`Setting newly assigned partitions set()`): no
    groups, a `KeyError` on a revoked changelog partition, and the worker crashed. A topic's group
    does not change while the app's topics stay the same, so the groups of earlier assignments are
    kept and used for topics the new one lacks.
    """
    if cls is None:
        from faust.assignor.partition_assignor import PartitionAssignor as cls
    if getattr(cls.on_assignment, "_pql", False):
        return
    on_assignment = cls.on_assignment

    def remember(self, assignment) -> None:
        known = {**getattr(self, "_pql_groups", {}), **self._topic_groups}
        on_assignment(self, assignment)
        self._pql_groups = {**known, **self._topic_groups}

    def group_for_topic(self, topic: str) -> int:
        groups = self._topic_groups
        return groups[topic] if topic in groups else getattr(self, "_pql_groups", groups)[topic]

    remember._pql = True
    cls.on_assignment, cls.group_for_topic = remember, group_for_topic


def exclusive_gaps(cls=None) -> None:
    """A gap in the offsets Faust reads never covers the message that revealed it.

    Faust (0.15.3, `_drain_messages`) counts offsets it skipped over (transaction markers, aborted
    records) as done, so that commits can pass them: reading offset 18 after 16, it marks 17 *and 18*
    done (`_add_gap(tp, 17, 18)` adds [17, 19)) before 18 is processed. A commit in between (the
    timer's) then carries 18 while its envelope is still being processed, and a SIGKILL right after
    loses it. Here the gap ends before the message.
    """
    from faust.transport.consumer import Consumer

    cls = cls or Consumer
    original = cls._add_gap
    if getattr(original, "_pql", False):
        return

    async def _add_gap(self, tp, offset_from, offset_to):
        await original(self, tp, offset_from, offset_to - 1)

    _add_gap._pql = True
    cls._add_gap = _add_gap


def no_batch_across_seeks(source: str, cls=None) -> None:
    """After a seek, nothing more of a batch fetched before it reaches the agents.

    Faust (0.15.3, `Recovery.on_recovery_completed`) resumes the source partitions, *then* seeks them
    to their committed offsets. Records fetched in between are still being handed out when the seek
    resets `_read_offset`: reading p1 at 23 right after the seek to 13, Faust took 14..22 for a gap
    of markers and committed past ten envelopes nobody had processed (the SIGKILL test lost 570 and
    698 of 1,500 handoffs in two runs of eight). Here a seek (Faust's `perform_seek`, `seek`) starts an
    epoch; a batch from an earlier epoch stops at once, the partitions go back to their committed
    offsets (a re-read is harmless: every line is deduplicated), and the gaps found so far are
    forgotten (reading again finds the real ones). Only seeks of `source` (<app>-accounts) count:
    table recovery seeks the changelogs, and must not be restarted by it.
    """
    from faust.transport.consumer import Consumer

    cls = cls or Consumer
    if getattr(cls.getmany, "_pql", False):
        return
    getmany, perform_seek, seek = cls.getmany, cls.perform_seek, cls.seek

    def new_epoch(self, tps) -> None:
        self._pql_epoch = getattr(self, "_pql_epoch", 0) + 1
        delivered = getattr(self, "_pql_delivered", {})
        for tp in tps:
            self._gap.pop(tp, None)
            delivered.pop(tp, None)

    async def _perform_seek(self):
        await perform_seek(self)
        new_epoch(self, list(self._read_offset))

    async def _seek(self, partition, offset):
        await seek(self, partition, offset)
        if partition.topic == source:
            new_epoch(self, [partition])

    async def _getmany(self, timeout):
        epoch = getattr(self, "_pql_epoch", 0)
        if not hasattr(self, "_pql_delivered"):
            self._pql_delivered = {}
        batch = getmany(self, timeout)
        try:
            async for tp, message in batch:
                if getattr(self, "_pql_epoch", 0) != epoch:
                    metrics.stale_batches.inc()
                    log.info("dropped the rest of a batch fetched before a seek; reading again from the "
                             "committed offsets")
                    try:
                        await self.perform_seek()
                    except Exception as err:  # e.g. a rebalance started: it seeks again itself
                        log.info("seek after a stale batch failed (%s)", err)
                    return
                if getattr(tp, "topic", None) == source:  # (read_to: what reached the agent's stream since the last seek)
                    self._pql_delivered[tp] = message.offset
                yield tp, message
        finally:
            await batch.aclose()

    _getmany._pql = True
    cls.getmany, cls.perform_seek, cls.seek = _getmany, _perform_seek, _seek


class PartitionMoved(Exception):
    """The partition went to another worker mid-envelope; its new owner processes the envelope."""


class Transactions:
    """The transactions of `source_topic`'s partitions, as Faust runs them, and sends into them.

    `lock` is held while an envelope's writes are sent: Faust's commits wait for it
    (`guard_commits`), so a transaction never holds part of an envelope, nor an envelope without its
    input offset.
    """

    def __init__(self, app, source_topic: str):
        self.app, self.source = app, source_topic
        self.lock = asyncio.Lock()
        self.soon: set[int] = set()  # partitions whose handoffs wait for the next early commit
        self.soon_task: asyncio.Task | None = None
        self.rollback = lambda partitions: None  # set by the app: memory back to the log (Publisher.rollback)
        self.frozen = False  # between a revocation and the next assignment: no envelope is published (Publisher)
        self.noted = None  # set by the app: notes what a commit will hold (guard_commits)
        self.flush = None  # set by the app: sends the table writes held for a commit (Publisher.flush)
        self.held = lambda: set()  # set by the app: partitions with writes in memory but not in their transaction
        self.spacing = 0.0  # s the timer's commits are apart at least now (set by the tick: `catching_up`)
        self._owned: set[int] | None = None  # `owned`, until the next rebalance
        self.outputs: list[str] = []  # set by the app: every topic `detect` sends to (`on_assigned`)
        self.before: dict = {}  # transactional id -> its producer when the last rebalance began (`on_assigned`)

    def catching_up(self, behind: int, interval: float) -> None:
        """The tick found the owned partitions `behind` records short of their logs' ends, in all: far
        behind (CATCHUP_RECORDS), the timer commits every `interval` s, not every PQL_COMMIT_INTERVAL."""
        self.spacing = interval if behind > CATCHUP_RECORDS else 0.0

    def tid(self, partition: int) -> str:
        """The transactional id Faust uses for this source partition (TransactionManager's format)."""
        return f"{self.app.conf.id}-{self.app.assignor.group_for_topic(self.source)}-{partition}"

    def start(self) -> set:
        """Called by `detect` when it starts: guard commits and acks (see those functions)."""
        guard_commits(self.app.consumer, self.lock, self.noted, lambda: self.spacing, self.flush, self.source)
        return guard_skips(self.app.consumer, self.source)

    def owns(self, partition: int) -> bool:
        return TP(self.source, partition) in self.app.consumer.assignment()

    def owned(self) -> set[int]:
        """The source partitions assigned to this worker, as of the last rebalance: for pacing the
        ingest tier (`owns` is the exact test). Faust's `assignment()` builds a new set of every
        assigned topic partition at each call: asked once per partition, at each of the ingest
        tier's looks (every 2 ms while it gathers a batch), it took 71 % of a 64-partition worker's
        CPU at 5,000 events/s, and once per look still 9 % (issue 25)."""
        if self._owned is None:
            self._owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.source}
        return self._owned

    async def send_all(self, sends: list, source: int, opens: bool = True) -> None:
        """An envelope's writes, each (topic, key, value, headers, partition), into the transaction of
        source partition `source`, as one aiokafka batch per topic partition (`send_batch`; Faust's
        `send` costs a coroutine, a lock and a log call per message). In order per topic partition.

        Only the first batch may start a new transaction and retry (`opens`: nothing of ours is in the
        open transaction yet): later, the lost transaction may hold earlier batches. Fenced, or still
        unusable: restart clean (a restart reads again from the committed offsets, so nothing is lost
        or sent twice).
        """
        by_tp: dict[tuple[str, int], list] = {}
        for topic, key, value, headers, partition in sends:
            by_tp.setdefault((topic, partition), []).append((key.encode(), value, headers or []))
        first = opens
        for (topic, partition), msgs in by_tp.items():
            done = 0
            while done < len(msgs):
                done = await self._batch(topic, partition, msgs, done, source, first)
                first = False

    async def _batch(self, topic: str, partition: int, msgs: list, start: int, source: int, first: bool) -> int:
        """Send msgs[start:] (as many as one batch holds); returns where the next batch starts."""
        tid = self.tid(source)
        faust_producer = self.app.producer
        for attempt in (1, 2) if first else (2,):
            try:
                producer = faust_producer._transaction_producers.get(tid)
                if producer is None:
                    raise ProducerSendError(f"no transaction producer for {tid}")
                batch, end = producer.create_batch(), start
                while end < len(msgs):  # the first message always fits (aiokafka's BatchBuilder)
                    key, value, headers = msgs[end]
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        break
                    end += 1
                async with faust_producer._trn_locks.setdefault(tid, asyncio.Lock()):
                    await producer.send_batch(batch, topic, partition=partition)
                return end
            except ProducerFenced as err:
                fatal = err
                break
            except (IllegalOperation, ProducerSendError, KafkaError) as err:
                fatal = err
                if not self.owns(source):
                    raise PartitionMoved() from None  # never touch a producer we do not own
                if attempt == 1:
                    await faust_producer.maybe_begin_transaction(tid)
        log.critical("transaction for partition %d lost (%s); exiting for a clean restart", source, fatal)
        os._exit(70)

    async def on_revoked(self, sender, revoked, **kwargs) -> None:
        """Commit what `detect` published before a rebalance replaces the producers.

        Faust (0.15.3) does not commit when partitions are revoked (it flushes), and `on_assigned` then
        starts fresh producers whose init aborts any transaction still open, while the tables in
        memory keep what it held: the chaos run found a handoff marked sent in state whose event was
        aborted, never published. So commit here, whatever the timer's spacing (`catching_up`: a
        skipped commit left memory ahead of the committed offsets); a partition whose transaction
        still holds sends (the commit failed), or whose writes never reached it (`held`), is rolled
        back: its values leave memory and table recovery reads its changelogs again
        (`pql_rollbacks_total`). Until the assignment, no envelope is published (`send` raises
        PartitionMoved: it is read again after the rebalance).
        """
        self.frozen = True
        self._owned = None
        self.spacing = 0.0
        self.before = dict(self.app.producer._transaction_producers)
        try:
            await self.app.consumer.commit()
        except Exception as err:
            log.warning("commit before the rebalance failed (%s)", err)
        dirty = self.uncommitted() | self.held()
        if dirty:
            log.warning("partitions %s had uncommitted envelopes at a rebalance: rebuilding their tables from "
                        "the changelogs", sorted(dirty))
            metrics.rollbacks.inc(len(dirty))
            self.rollback(dirty)

    def uncommitted(self) -> set[int]:
        """Source partitions whose open transaction holds sends."""
        try:
            prefix = f"{self.app.conf.id}-{self.app.assignor.group_for_topic(self.source)}-"
        except KeyError:  # no assignment yet (the first rebalance): no transaction either
            return set()
        out = set()
        for tid, producer in list(self.app.producer._transaction_producers.items()):
            txn = getattr(producer, "_txn_manager", None)
            if tid.startswith(prefix) and txn is not None and txn.is_in_transaction() and (
                    txn._txn_partitions or txn._pending_txn_partitions):
                out.add(int(tid[len(prefix):]))
        return out

    async def on_assigned(self, sender, assigned, **kwargs) -> None:
        """Start every owned partition on a fresh producer.

        Faust (0.15) does not always stop the transactional producers of partitions it loses in an
        eager rebalance; the new owner fences them, and when a partition comes back Faust reuses the
        fenced producer. A fresh producer's init fences any other and aborts leftovers (what was
        acked was committed when the partitions were revoked). A producer Faust made in this
        rebalance is fresh already: made again, a 256-partition start made 512 producers, in turn.
        """
        owned = sorted({self.tid(tp.partition) for tp in assigned if tp.topic == self.source})
        before, self.before = self.before, {}
        stale = [tid for tid in owned if not self._fresh(tid, before)]
        async with self.lock:
            await at_most(STARTS_AT_ONCE, [self._renew(tid) for tid in stale])
            await self.know_outputs(owned)
            self.frozen = False
            self._owned = None

    def _fresh(self, tid: str, before: dict) -> bool:
        """Made in this rebalance (not there when it began), and in a transaction."""
        producer = self.app.producer._transaction_producers.get(tid)
        txn = getattr(producer, "_txn_manager", None)
        return producer is not None and producer is not before.get(tid) and txn is not None and txn.is_in_transaction()

    async def _renew(self, tid: str) -> None:
        try:
            await self.app.producer.stop_transaction(tid)
        except Exception:  # already stopped, or fenced: replaced below either way
            pass
        await self.app.producer.begin_transaction(tid)

    async def know_outputs(self, tids: list[str]) -> None:
        """Each fresh producer learns every output topic's partitions now, from one metadata request.

        aiokafka's producer asks for a topic's metadata when it first sends to it, and asks again for
        all its topics so far: at 64 partitions 64 producers made ~380 metadata requests in the first
        seconds of work (every changelog, the forwards, then pql.signals and pql.handoffs with the
        first decisions), each answer decoded in Python (session 21). One request each still took
        256 partitions' producers 9 s of decoding at start, past the session timeout (session 23):
        one producer asks, the others take its answer (`adopt_metadata`). Best effort: a failure
        here leaves aiokafka to ask when it sends, as before."""
        producers = [p for tid in tids if (p := self.app.producer._transaction_producers.get(tid)) is not None]
        if not self.outputs or not producers:
            return
        topics = set(self.outputs).union(*(p.client._topics for p in producers))
        try:
            await producers[0].client.set_topics(sorted(topics))
        except Exception as err:
            log.info("output topics' metadata not read ahead (%s)", err)
            return
        for p in producers[1:]:
            p.client._topics = set(topics)
            adopt_metadata(p.client.cluster, producers[0].client.cluster)

    def commit_soon(self, partition: int) -> None:
        """A handoff is readable only once its transaction commits: commit this partition's now, not
        at the next timer tick (the timer still commits everything else every PQL_COMMIT_INTERVAL).
        Partitions with handoffs close together share one early commit (their transactions commit
        side by side: `concurrent_commits`); one at a time, 64 partitions' handoffs after a backlog
        took 4 s of early commits, each holding up `detect` (issue 25)."""
        self.soon.add(partition)
        if self.soon_task is None:
            self.soon_task = asyncio.ensure_future(self._commit_soon())

    async def _commit_soon(self) -> None:
        try:
            while self.soon:
                await asyncio.sleep(HANDOFF_COMMIT_DELAY)
                partitions, self.soon = self.soon, set()
                try:
                    await self.app.consumer.commit(topics={TP(self.source, p) for p in partitions})
                except Exception as err:  # e.g. a rebalance: the timer or the new owner commits
                    log.info("early commit of partitions %s skipped (%s)", sorted(partitions), err)
        finally:
            self.soon_task = None


def guard_commits(consumer, lock: asyncio.Lock, noted=None, spacing=None, flush=None, source=None) -> None:
    """Make Faust's commits (timer, rebalance, shutdown) wait while `detect` is publishing.

    `noted()`, called before each commit, notes what the partitions' transactions hold: the
    progress reports tell only what committed ones hold (streams/worker/progress.py).
    `spacing()`: seconds the timer's commits (Faust calls `commit()` without arguments from its
    timer) must be apart now; one sooner is skipped: a worker catching up commits less often, each
    commit a round of transaction requests to every partition leader (cluster chaos seed 2 caught
    up in 58 s with PQL_COMMIT_INTERVAL=1.0, 100 s with 0.1; session 14). Its transactions grow
    meanwhile; what commits together is unchanged.
    `flush(partitions)`, awaited first, sends the table writes held for the commit's `source`
    partitions (None: all of them) into their transactions (Publisher.flush)."""
    if getattr(consumer, "_pql_guarded", False):
        return
    original = consumer.commit
    last = [0.0]

    async def commit(*args, **kwargs):
        if not args and not kwargs and spacing is not None and time.monotonic() - last[0] < spacing():
            return False
        async with lock:
            last[0] = time.monotonic()
            started = time.perf_counter()
            if flush is not None:
                await flush(committing(args, kwargs, source))
            if noted is not None:
                noted()
            try:
                return await original(*args, **kwargs)
            finally:
                metrics.commit_seconds.observe(time.perf_counter() - started)

    consumer.commit = commit
    consumer._pql_guarded = True


def committing(args: tuple, kwargs: dict, source: str | None) -> set[int] | None:
    """The `source` partitions a Faust commit call names (`commit(topics)`: TPs or topic names);
    None when it commits every partition."""
    topics = kwargs.get("topics", args[0] if args else None)
    if not topics or source is None or any(isinstance(t, str) for t in topics):
        return None
    return {tp.partition for tp in topics if tp.topic == source}


def noted_fetches(source: str, cls=None) -> None:
    """aiokafka notes, as it hands records over, how far each `source` partition has been handed out.

    aiokafka (0.14) advances a partition's position when its fetcher returns records to Faust's
    consumer thread (`_fetch_records`); Faust then hands them to the agent's stream one by one
    (`getmany` above). A tick in between saw the position at the high watermark and the last
    delivered message processed, and took the partition for idle with a batch still on its way: it
    counted reports whose fence lay past envelopes it had not processed (session 14, found by the barrier's own check that a
    partition never counts backwards). Here, after each fetch, each assigned `source` partition's
    position and the last offset returned are noted (`_pql_handed`: {tp: (position, last offset)}),
    that last offset first: `read_to` trusts a position only once it is noted.
    """
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    cls = cls or AIOKafkaConsumerThread
    if getattr(cls._fetch_records, "_pql", False):
        return
    fetch = cls._fetch_records

    async def _fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
        records = await fetch(self, consumer, active_partitions, timeout=timeout, max_records=max_records)
        handed = consumer.__dict__.setdefault("_pql_handed", {})
        assignment = consumer._fetcher._subscriptions.subscription.assignment
        for tp in consumer.assignment():
            if tp.topic == source:
                got = records.get(tp)
                last = got[-1].offset if got else handed.get(tp, (None, None))[1]
                try:
                    handed[tp] = (assignment.state_value(tp).position, last)
                except Exception:  # revoked meanwhile
                    handed.pop(tp, None)
        return records

    _fetch_records._pql = True
    cls._fetch_records = _fetch_records


def read_to(app, tp: TP) -> tuple[int | None, int | None]:
    """(aiokafka's position of `tp`: the next offset its fetcher hands out, past the control and
    aborted batches it has skipped; the last offset handed towards `tp`'s stream: what Faust
    delivered since its last seek (`no_batch_across_seeks`) or, when later, what aiokafka returned
    to Faust (`noted_fetches`)), None when not known: the position is None until `noted_fetches`
    has noted it (records it returned may still be on their way to Faust). A partition whose
    position has reached its high watermark and whose handed messages are all processed has
    nothing left to read (progress.py's idle)."""
    from aiokafka.structs import TopicPartition

    key = TopicPartition(tp.topic, tp.partition)
    try:
        consumer = app.consumer._thread._ensure_consumer()
        assignment = consumer._fetcher._subscriptions.subscription.assignment
        state = assignment.state_value(key) if assignment else None
        position = state.position if state is not None and state.has_valid_position else None
        handed_at, handed = getattr(consumer, "_pql_handed", {}).get(key, (None, None))
    except Exception:  # no consumer yet, or being rebalanced
        position, handed_at, handed = None, None, None
    if position is not None and handed_at != position:
        position = None  # advanced by a fetch whose records are not noted yet
    delivered = getattr(app.consumer, "_pql_delivered", {}).get(tp)
    if handed is not None and (delivered is None or handed > delivered):
        delivered = handed
    return position, delivered


def committed(app, tp: TP) -> int | None:
    """The offset Faust last committed for `tp` (in its transaction), None before the first."""
    return app.consumer._committed_offset.get(tp)


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


def rare_metadata_refresh(producer) -> None:
    """Producers refresh their metadata every PRODUCER_METADATA_MAX_AGE_MS, not aiokafka's 5 minutes.

    One producer per partition: at 256 partitions, started together, they all asked for every
    output topic's metadata within a second every 5 minutes (~2,000 partitions to decode in Python
    each, a few seconds of CPU each time: about 2 % of a core idle, session 23). A producer asks
    anyway when a send fails for a moved leader or a lost connection, and the partition counts are
    fixed (PQL_PARTITIONS); the periodic refresh finds nothing those do not.
    """
    extra = producer._settings_extra
    producer._settings_extra = lambda: {**extra(), "metadata_max_age_ms": PRODUCER_METADATA_MAX_AGE_MS}


def concurrent_commits(producer) -> None:
    """Commit the partitions' transactions side by side, not one after the other.

    Faust (0.15.3, `Producer.commit_transactions`) commits each partition's transaction in turn:
    AddOffsetsToTxn, TxnOffsetCommit and EndTxn, three round trips each, while `detect` waits for
    the commit (`guard_commits`). With 64 partitions busy that was about 64 x 3 round trips per
    commit (issue 25). Each partition has its own producer, so their commits do not depend on each
    other: here they run together; when one fails the others still finish, then the first error is
    raised as Faust's own loop would have raised it.
    """
    from faust.transport.drivers.aiokafka import logger as faust_log

    async def commit_transactions(tid_to_offset_map, group_id, start_new_transaction=True):
        async def one(tid, offsets):
            async with producer._trn_locks[tid]:
                txn = producer._transaction_producers.get(tid)
                if txn is None:
                    faust_log.warning(f"Commit invoked for unknown transaction {tid}")
                    return
                await txn.send_offsets_to_transaction(offsets, group_id)
                await txn.commit_transaction()
                if start_new_transaction:
                    await txn.begin_transaction()

        done = await asyncio.gather(*(one(t, o) for t, o in tid_to_offset_map.items()), return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    producer.commit_transactions = commit_transactions


async def at_most(n: int, coros: list) -> None:
    """Run the coroutines side by side, n at a time at most."""
    limit = asyncio.Semaphore(n)

    async def one(coro):
        async with limit:
            await coro

    await asyncio.gather(*(one(c) for c in coros))


def concurrent_starts(cls=None) -> None:
    """Start the partitions' transactional producers side by side, not one after the other.

    Faust (0.15.3, `TransactionManager._start_transactions`) starts them in turn at each rebalance:
    a client, its bootstrap, FindCoordinator and InitProducerId each, about 10 ms: 2.6 s for 256
    partitions, while the group waits for the rebalance to end (session 23). Each partition has its
    own producer; `maybe_begin_transaction` logs and swallows its own failures, as before.
    """
    from faust.transport.consumer import TransactionManager

    cls = cls or TransactionManager

    async def _start_transactions(self, tids) -> None:
        await at_most(STARTS_AT_ONCE, [self.producer.maybe_begin_transaction(t) for t in tids])

    cls._start_transactions = _start_transactions


def adopt_metadata(cluster, source) -> None:
    """`cluster` takes `source`'s brokers and topic partitions (both aiokafka ClusterMetadata of the
    same Kafka cluster). aiokafka's `update_metadata` replaces these containers whole, never changes
    them in place, so they can be shared; each client still refreshes its own when it has to."""
    with cluster._lock:
        cluster._brokers = source._brokers
        cluster.controller = source.controller
        cluster._partitions = source._partitions
        cluster._broker_partitions = source._broker_partitions
        cluster.unauthorized_topics = source.unauthorized_topics
        cluster.internal_topics = source.internal_topics
        cluster._last_refresh_ms = source._last_refresh_ms
        cluster._last_successful_refresh_ms = source._last_successful_refresh_ms
        cluster._need_update = False


def stop_within(worker, seconds: float) -> None:
    """SIGTERM and SIGINT start a clock: a worker still stopping `seconds` later exits with code 1
    and a CRITICAL line. Faust's graceful stop waits for its consumer, which, when Kafka went away
    meanwhile, reconnects for ever (measured: 8 minutes and counting at 64 partitions; issue 24).
    Exiting then is as safe as a SIGKILL: every output is in a transaction. (mode's Worker installs
    `_on_sigterm` / `_on_sigint` as the loop's signal handlers when it starts: we wrap them first.)"""
    import threading

    started = []

    def expire() -> None:
        log.critical("the worker did not stop within PQL_SHUTDOWN_TIMEOUT (%.0f s); exiting (code 1)", seconds)
        logging.shutdown()
        os._exit(1)

    def clocked(handler):
        def on_signal() -> None:
            if not started:
                timer = threading.Timer(seconds, expire)
                timer.daemon = True
                timer.start()
                started.append(timer)
            handler()
        return on_signal

    worker._on_sigterm = clocked(worker._on_sigterm)
    worker._on_sigint = clocked(worker._on_sigint)
