"""Ingest tier: product.events and sales.responses -> envelopes for the Faust tier, rejects -> DLQ.

Runs inside the worker process as an asyncio task around a confluent-kafka consumer (its own
consumer group, `<app id>-ingest`). Per batch: validate every message, attribute it to an account,
drop what no rule can use, pack the rest into one envelope per destination partition, publish,
wait for the acks, then commit the input offsets. At-least-once: after a crash a batch may be sent
again, and the detection tier ignores the repeats (messageId dedupe), so nothing is lost and
nothing counts twice.

Identity is not resolved here: `detectors/identity.dispatch` (the function `pql replay` uses) says
which lines an event becomes, each for the partition that owns its key: an event with
`context.groupId` goes to its account; one without goes to its user key, whose partition keeps the
user's group calls and held events in the Faust tier (see streams/worker/detect.py), durable and exactly
once; a group call goes to its account and to each of its user keys; an identify that joins an
anonymous id goes to that id.

Sales responses are validated here (an unknown rejection reason goes to the DLQ as bad_response)
and forwarded to their account's partition. At each of the worker's ticks (streams/worker/progress.py)
the tier reports how far it has routed each of its input partitions (`report`) and sends a tick line
to the partitions that need one (`tick`), so SLA clocks are checked in partition order, in `detect`.

Rejects go to the DLQ with the original key and bytes, and headers pql.error.reason / detail /
topic / partition / offset.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from schemas import formats
from streams.produce import produce
from streams.topics import Topics
from streams.worker import dlq, envelope, metrics
from streams.worker.kafka import partitions_named, poll
from streams.worker.merge import Merge
from streams.worker.route import Batch, Router

log = logging.getLogger("pql.ingest")
QUIET = 30.0  # seconds without a poll after which the loop counts as stopped (/ready says 503)
IDLE_POLL = 0.5  # s a poll waits for a first message when nothing is held (an idle tier wakes twice a second)
CONFIRM_WAIT = 0.5  # s the merge's end confirmations (`_confirm`) may hold routing, in all
RECREATE = 3  # times a minute the consumer may be made anew after a fatal error before the worker stops


def fatal(err) -> bool:
    """A librdkafka error the client cannot recover from. (A fenced static consumer's error comes as
    a message error with code _FATAL whose fatal() is False: seen with confluent-kafka 2.x.)"""
    from confluent_kafka import KafkaError

    return err.fatal() or err.code() == KafkaError._FATAL


class FatalClientError(RuntimeError):
    """A Kafka client of the ingest tier can no longer work (librdkafka's fatal errors: a static
    member fenced by another with the same group.instance.id, a fenced or failed idempotent producer).
    The worker stops with a non-zero exit instead of staying alive without input (issue 24)."""


class Ingest:
    """The consume -> route -> publish -> commit loop."""

    def __init__(self, conf: dict, group_id: str, router: Router, topics: Topics, batch_size: int,
                 linger_s: float = 0.0, linger_max_s: float = 0.0,
                 processed: Callable[[], dict[int, int]] = dict, merge_wait: float = 0.5):
        from confluent_kafka import Consumer, Producer

        self.merge = Merge(merge_wait, router.engine.rules.lateness // 2)
        self.read: dict[tuple[str, int], int] = {}  # input partition -> last offset consumed
        self.owned: set[tuple[str, int]] = set()  # input partitions assigned to us now (rebalance callbacks)
        # product.events / sales.responses partition -> newest event / answer time routed from it, acked
        self.routed: dict[int, int] = {}
        self.answered: dict[int, int] = {}
        self.ends: dict[tuple[str, int], int] = {}  # input partition -> its end as of the last fetch (`_ends`)
        self.flying: set[tuple[str, int]] = set()  # input partitions whose envelopes are not all acked yet

        self.router, self.topics, self.batch_size, self.linger_s = router, topics, batch_size, linger_s
        self.linger_max_s = max(linger_s, linger_max_s)
        # Self-clocking: `processed()` maps each accounts partition this process's Faust tier owns to
        # the next envelope offset it has yet to publish; `sent` holds the last offset we wrote to
        # each partition. While one is behind the other, we keep gathering (see `linger`).
        self.processed, self.sent = processed, {}
        self.fatal: str | None = None  # librdkafka's word that the producer is done for
        self.consumer_fatal: str | None = None  # ... that the consumer is (it is made anew)
        self.recreated: list[float] = []  # when the consumer was made anew
        self.polled_at = time.monotonic()
        self.consumer_conf = {
            **conf, "error_cb": self._consumer_error, "group.id": group_id, "enable.auto.commit": False,
            # range: each input topic split evenly among the workers. (cooperative-sticky balances only
            # the total count: after a few restarts one worker held every product.events partition and
            # the other every sales.responses one, and routed the whole stream alone: cluster chaos.)
            "auto.offset.reset": "earliest", "partition.assignment.strategy": "range",
            "fetch.wait.max.ms": 200, "queued.max.messages.kbytes": 16384, "statistics.interval.ms": 5000,
        }
        self.consumer = Consumer(self.consumer_conf)
        self.lag_at = 0.0
        consumer_only = ("session.timeout.ms", "heartbeat.interval.ms")
        self.producer = Producer({
            **{k: v for k, v in conf.items() if k not in consumer_only}, "error_cb": self._client_error,
            "enable.idempotence": True, "linger.ms": 2, "compression.type": "lz4",
            "batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
        })
        self.failed: list[str] = []
        self.running = True

    def _client_error(self, err) -> None:
        """librdkafka's global errors: most are transient (a broker down: it reconnects); a fatal one
        of the producer ends the loop."""
        if fatal(err):
            self.fatal = self.fatal or str(err)
        else:
            log.debug("kafka client: %s", err)

    def _consumer_error(self, err) -> None:
        if fatal(err):
            self.consumer_fatal = self.consumer_fatal or str(err)
        else:
            log.debug("kafka consumer: %s", err)

    def alive(self) -> bool:
        """Still polling (for /ready)."""
        return self.running and self.fatal is None and time.monotonic() - self.polled_at < QUIET

    async def _check(self) -> None:
        """A fatal producer error ends the loop; a fatal consumer error (a static member fenced after
        its group's coordinator moved: issue 24) makes the consumer anew, at most RECREATE times a
        minute, then ends the loop too."""
        if self.fatal is not None:
            raise FatalClientError(f"ingest tier: fatal Kafka client error: {self.fatal}")
        if self.consumer_fatal is None:
            return
        now = time.monotonic()
        self.recreated = [t for t in self.recreated if now - t < 60] + [now]
        if len(self.recreated) > RECREATE:
            raise FatalClientError(f"ingest tier: fatal Kafka client error: {self.consumer_fatal} "
                                   f"({RECREATE} times within a minute)")
        log.error("ingest tier: fatal Kafka consumer error: %s; making the consumer anew", self.consumer_fatal)
        metrics.clients_recreated.inc()
        from confluent_kafka import Consumer, TopicPartition

        self._revoked(None, [TopicPartition(*tp) for tp in self.owned | set(self.read)])  # what is held is read again
        old, self.consumer_fatal = self.consumer, None
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, old.close), 10)
        except Exception as err:  # a fenced consumer may refuse to close cleanly: it is dropped anyway
            log.warning("closing the old consumer: %r", err)
        self.consumer = Consumer(self.consumer_conf)
        self._subscribe()

    def _subscribe(self) -> None:
        self.consumer.subscribe([*self.topics.events, *self.topics.responses], on_assign=self._assigned,
                                on_revoke=self._revoked, on_lost=self._revoked)

    def _assigned(self, consumer, partitions) -> None:
        metrics.rebalances.inc()
        inputs = [tp for tp in partitions if tp.topic in self.topics.events or tp.topic in self.topics.responses]
        self.owned.update((tp.topic, tp.partition) for tp in inputs)
        if inputs:
            log.info("ingest tier: assigned %s", partitions_named(inputs))
        try:  # where each new input partition starts, so `_behind` knows it before its first message
            for tp in consumer.committed(inputs, timeout=10):
                start = tp.offset if tp.offset >= 0 else consumer.get_watermark_offsets(tp, timeout=10)[0]
                self.read[(tp.topic, tp.partition)] = start - 1
        except Exception as err:  # the merge then starts with what it reads
            log.warning("could not read the start of input partitions: %s", err)

    def _revoked(self, consumer, partitions) -> None:
        gone = [(tp.topic, tp.partition) for tp in partitions]
        self.owned.difference_update(gone)
        if gone:
            log.info("ingest tier: %s %s", "revoked" if consumer is not None else "dropped", partitions_named(partitions))
        self.merge.drop(gone)
        for tp in gone:
            self.read.pop(tp, None)
            (self.routed if tp[0] in self.topics.events else self.answered).pop(self.topics.index(*tp), None)

    def _ends(self) -> None:
        """Note each input partition's end as of the last fetch, for `_behind`. Only here, between two
        polls: confluent-kafka's get_watermark_offsets waits while another thread is in consume()
        (for the whole poll: the tick's report blocked the event loop for it, session 13)."""
        from confluent_kafka import TopicPartition

        for tp in list(self.owned):
            try:
                self.ends[tp] = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1]
            except Exception:  # not fetched yet
                self.ends.pop(tp, None)

    def _confirm(self, tps: list) -> None:
        """Each partition's end from the broker, not the cached one (see streams/worker/merge.py). Only
        between two polls, like `_ends`; a broker that does not answer (a node down) leaves the cached
        end, and the routing waits at most CONFIRM_WAIT seconds in all."""
        from confluent_kafka import TopicPartition

        deadline = time.monotonic() + CONFIRM_WAIT
        for tp in tps:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                self.ends[tp] = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=left)[1]
            except Exception as err:
                log.debug("end of %s: %s", tp, err)

    def _behind(self, tp: tuple[str, int]) -> bool:
        """Has the broker more of this partition than we have read (as of the last fetch)? Yes while
        we do not know (not fetched yet, about a second after an assignment)."""
        high = self.ends.get(tp)
        return high is None or high < 0 or high > self.read.get(tp, -1) + 1

    def _lag(self) -> None:
        """pql_consumer_lag for product.events: high watermark minus our position (every 5 s)."""
        now = time.monotonic()
        if now - self.lag_at < 5:
            return
        self.lag_at = now
        for tp in self.consumer.position(self.consumer.assignment()):
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except Exception:  # no statistics yet for this partition
                continue
            if high >= 0 and tp.offset >= 0:
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - tp.offset))

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failed.append(str(err))
        elif msg.topic() == self.topics.accounts:
            self.sent[msg.partition()] = max(self.sent.get(msg.partition(), -1), msg.offset())

    def detect_busy(self) -> bool:
        """Is our Faust tier still on an envelope we sent it? (Only partitions it owns count.)"""
        done = self.processed()
        return any(p in done and done[p] <= offset for p, offset in self.sent.items())

    async def run(self) -> None:
        self._subscribe()
        try:
            while self.running:
                await self._check()
                self.polled_at = time.monotonic()
                self._lag()
                # (a message ends the wait at once; while the merge holds events, 50 ms lets it release them)
                msgs = await poll(self.consumer, self.batch_size, 0.05 if self.merge.held else IDLE_POLL)
                self._ends()
                if msgs:
                    await self.linger(msgs)
                elif not self.merge.held:
                    continue
                await self.handle(msgs)
        finally:
            self.close()

    async def linger(self, msgs: list) -> None:
        """Gather messages for `linger_s` after the first, then for as long as the Faust tier is still
        busy with our previous envelopes (up to `linger_max_s`, or a full batch).

        Fewer, fuller envelopes mean less work per event in the Faust tier. Sending a new envelope
        while the last one waits in the queue gains nothing; holding it lets it grow, so a busy tier
        gets bigger envelopes and catches up, and an idle one gets each batch at once.
        """
        start = time.monotonic()
        while len(msgs) < self.batch_size:
            waited = time.monotonic() - start
            if waited >= self.linger_max_s or (waited >= self.linger_s and not self.detect_busy()):
                return
            more = self.consumer.consume(self.batch_size - len(msgs), timeout=0)
            if more:
                msgs.extend(more)
            else:
                await asyncio.sleep(0.002)

    async def handle(self, msgs: list) -> None:
        """Route what may go on (events through `merge`), publish, wait for the acks, commit the
        input up to the first message still held."""
        self._ends()  # (`linger` may have read more)
        batch, touched, routed, answered = Batch(), set(), {}, {}
        for m in msgs:
            if m.error() is not None:
                if fatal(m.error()):  # the consumer is made anew before the next poll (_check)
                    self.consumer_fatal = self.consumer_fatal or str(m.error())
                log.warning("consume error: %s", m.error())
                continue
            tp = (m.topic(), m.partition())
            if tp not in self.owned:  # revoked since it was fetched (`linger` polls, and polling runs the
                continue              # callbacks): its new owner reads it; kept, it was reported for ever
            self.read[tp] = m.offset()
            touched.add(tp)
            raw = m.value() or b""
            if m.topic() in self.topics.responses:
                at = self.topics.index(*tp)
                if (r := self.router.route_response(raw, batch, m)) is not None and r.ms > answered.get(at, 0):
                    answered[at] = r.ms
            elif (parsed := self.router.parse(raw, batch, m)) is not None and self.router.wanted(event := parsed[0]):
                self.merge.add(tp, event.ms, event.messageId, m.offset(), (event, parsed[1], m))
        assigned = [tp for tp in self.read if tp[0] in self.topics.events and tp in self.owned]
        if stale := self.merge.unconfirmed(assigned, self._behind):
            await asyncio.get_running_loop().run_in_executor(None, self._confirm, stale)
        for event, raw, m in self.merge.ready(assigned, self._behind, time.monotonic()):
            self.router.route_event(event, raw, batch, m)
            touched.add((m.topic(), m.partition()))
            at = self.topics.index(m.topic(), m.partition())
            if event.ms > routed.get(at, 0):
                routed[at] = event.ms
        self.flying = touched  # (a report made while they fly tells what was acked before)
        for (topic, partition), items in batch.envelopes.items():
            for body in envelope.pack_all(items):
                self._produce(topic, body, partition=partition, headers=formats.HEADERS)
        for kind, n in batch.consumed.items():
            metrics.events_consumed.labels(kind).inc(n)
        for m, reason, detail in batch.rejects:
            metrics.events_invalid.labels(reason).inc()
            value, headers = dlq.record(m.value(), m.topic(), m.partition(), m.offset(), reason, detail)
            self._produce(self.topics.dlq, value, key=m.key(), headers=headers)
        await self._acks()
        if batch.links:  # each group call's account learns where its LINK lines are, now that they are in
            self._linked(batch.links)
            await self._acks()
        for into, new in ((self.routed, routed), (self.answered, answered)):
            for at, ms in new.items():
                into[at] = max(into.get(at, 0), ms)
        self.flying = set()
        from confluent_kafka import TopicPartition

        commit = []
        for tp in touched:
            first = self.merge.first_offset(tp)
            commit.append(TopicPartition(*tp, first if first is not None else self.read[tp] + 1))
        if commit:
            self.consumer.commit(offsets=commit, asynchronous=True)

    async def _acks(self) -> None:
        """Wait for every ack (before committing the input, or telling where lines are)."""
        while self.producer.flush(0) > 0:
            await asyncio.sleep(0.001)
        if self.failed:
            raise RuntimeError(f"ingest could not publish: {self.failed[0]}")

    def _linked(self, links: list) -> None:
        """A LINKED line to each cross-partition group call's account: its LINK line is at or before
        the last offset acked on its partition. The user key's partition may then leave out a MARK
        that would carry nothing (detect.py `_link_forwards`): the account counts the slot released once that
        partition reports it has committed past the offset. (Sent after the acks: a line before
        them could name an offset below the LINK.)"""
        by_home: dict[int, list] = {}
        for home, account, call, slot, p in links:
            by_home.setdefault(home, []).append(envelope.encode(envelope.LINKED, account, (call, slot, p, self.sent[p])))
        for home, items in by_home.items():
            for body in envelope.pack_all(items):
                self._produce(self.topics.accounts, body, partition=home, headers=formats.HEADERS)

    def report(self, ms: int) -> list[tuple[str, int, tuple[int, int]]]:
        """This tick's report (the barrier, streams/worker/barrier.py), as (kind, input partition,
        (tick, time)), also written to `<app>-progress` for the other workers: for each of our
        product.events partitions the newest event time routed from it, or IDLE when nothing of it
        is held, unread or unacked; the same for our sales.responses partitions (answer times),
        which SLA clocks wait for. Only acked envelopes count: a report is read after what it covers."""
        reports = []
        for (topic, partition) in [tp for tp in list(self.read) if tp in self.owned]:  # (copies: rebalance
            # callbacks change them in consume's thread)
            idle = ((topic, partition) not in self.flying and not self._behind((topic, partition))
                    and self.merge.first_offset((topic, partition)) is None)
            at = self.topics.index(topic, partition)
            if topic in self.topics.events:
                reports.append((envelope.INPUT, at, (ms, envelope.IDLE if idle else self.routed.get(at, 0))))
            elif topic in self.topics.responses:
                reports.append((envelope.ANSWERS, at, (ms, envelope.IDLE if idle else self.answered.get(at, 0))))
        for body in envelope.pack_all([envelope.told(kind, at, *told) for kind, at, told in reports]):
            self._produce(self.topics.progress, body, headers=formats.HEADERS)
        self.producer.poll(0)
        return reports

    def tick(self, partitions: list[int], ms: int) -> None:
        """A tick line (wall clock, ms) to each of these accounts partitions: SLA clocks advance and
        waiting decisions are made (streams/worker/progress.py says which need one)."""
        for p in partitions:
            self._produce(self.topics.accounts, envelope.tick(ms), partition=p, headers=formats.HEADERS)
        self.producer.poll(0)

    def _produce(self, topic: str, value: bytes, **kw) -> None:
        produce(self.producer, topic, value, on_delivery=self._delivered, **kw)

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception:  # already closed
            pass
        self.producer.flush(10)


class Task:
    """The worker's ingest task: the loop above, its consumer group `<app id>-ingest`, paced by where
    this worker's `detect` is (`unpublished`)."""

    def __init__(self, settings, engine, topics: Topics, unpublished: Callable[[], dict[int, int]]):
        self.settings, self.engine, self.topics, self.unpublished = settings, engine, topics, unpublished
        self.loop: Ingest | None = None

    async def run(self) -> None:
        self.loop = make(self.settings, self.engine, self.topics, self.unpublished)
        try:
            await self.loop.run()
        except FatalClientError as err:
            log.critical("%s; the worker stops (exit code 1): restart it (a supervisor does)", err)
            raise

    def alive(self) -> bool:
        return self.loop is not None and self.loop.alive()


def make(s, engine, topics: Topics, unpublished: Callable[[], dict[int, int]]) -> Ingest:
    """The ingest loop for these settings (in the worker's process, or in its own: ingest_process.py)."""
    conf = {**s.confluent(), "session.timeout.ms": int(s.session_timeout * 1000),
            "heartbeat.interval.ms": int(s.session_timeout * 200)}
    if s.instance_id:  # static membership: a restarted worker gets its input partitions back at once
        conf["group.instance.id"] = f"{s.instance_id}-ingest"
    return Ingest(conf, f"{s.app_id}-ingest", Router(engine, topics, s.partitions, s.max_event_bytes, int(s.max_future * 1000)), topics,
                  s.ingest_batch, s.ingest_linger, s.ingest_linger_max, unpublished, s.ingest_merge_wait)
