"""The live worker: a Faust app around the detection engine.

Agents (concurrency 1 each; faust-streaming issue 606):
- `detect`   <app>-accounts envelopes (events, sales responses, ticks) -> tables `accounts` and
             `clocks` -> pql.handoffs / pql.signals (handoffs, milestones, stages, SLA breaches)
- `crm`      crm.lifecycle -> Redis MQL store
plus the ingest tier (streams/ingest.py) and the alerts (streams/alerts.py) as tasks, a timer that
ticks the SLA clocks, and /metrics on the web port.

Exactly one handoff: processing_guarantee="exactly_once". Faust gives each source partition p a
transactional producer and commits that partition's input offsets in its transaction. Every write
`detect` makes for an envelope of partition p goes to partition p of a co-partitioned topic (the
`accounts` changelog, pql.handoffs, pql.signals) through that same producer, and commits are held
off while an envelope is being published, so state, outputs and offsets commit together or not at
all. See README "Exactly one handoff".
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time

import faust
from aiokafka.errors import IllegalOperation, ProducerFenced
from faust.exceptions import ProducerSendError
from faust.types import TP
from pydantic import ValidationError

from detectors.engine import Engine
from schemas.mql import MqlRecord
from schemas.rules import Rules
from schemas.sales import problem
from streams import envelope, metrics
from streams.config import Settings
from streams.detect import Detect
from streams.eos import guard_commits, guard_skips, reread_skipped, seek_uncommitted_to_start, short_retries
from streams.ingest import Ingest, Router, dlq_headers
from streams.mqlstore import AsyncMqlStore
from streams.topics import Topics

log = logging.getLogger("pql.worker")
CE_HEADERS = [("content-type", b"application/cloudevents+json")]
HANDOFF_COMMIT_DELAY = 0.005


def _credentials(s: Settings):
    if s.kafka_security_protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None)
        if s.kafka_ssl_certfile:
            ssl_context.load_cert_chain(str(s.kafka_ssl_certfile), str(s.kafka_ssl_keyfile) if s.kafka_ssl_keyfile else None)
    if s.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=s.kafka_sasl_username, password=s.kafka_sasl_password,
                                     mechanism=s.kafka_sasl_mechanism or "PLAIN", ssl_context=ssl_context)
    return faust.SSLCredentials(ssl_context)


def build(settings: Settings, rules: Rules) -> faust.App:
    s, topics, engine = settings, Topics.of(settings), Engine(rules)
    (s.data_dir / s.app_id).mkdir(parents=True, exist_ok=True)
    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        broker_credentials=_credentials(s),
        store=s.store,
        datadir=str(s.data_dir / s.app_id),
        processing_guarantee="exactly_once",
        producer_acks=-1,
        topic_replication_factor=s.replication,
        topic_partitions=s.partitions,
        broker_commit_interval=s.commit_interval,
        broker_commit_every=100_000,
        consumer_auto_offset_reset="earliest",
        web_port=s.web_port,
        web_bind=s.web_host,
        web_host=s.web_host,
        stream_wait_empty=False,
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=s.session_timeout / 5,
    )
    P = s.partitions
    accounts_topic = app.topic(topics.accounts, key_type=bytes, value_type=bytes, key_serializer="raw",
                               value_serializer="raw", partitions=P)
    crm_topic = app.topic(topics.crm, key_serializer="raw", value_serializer="raw")
    # values are the state's JSON bytes, exactly what the changelog holds (see `detect`)
    accounts = app.Table("accounts", partitions=P, value_type=bytes)
    # SLA clocks: one value per partition, {handoff_id: [due_ms, account]} (detectors/sales.py)
    clocks = app.Table("clocks", partitions=P, value_type=bytes)
    # identity: user key -> UserState JSON (links, held events), on the user key's partition
    users = app.Table("users", partitions=P, value_type=bytes)
    short_retries(app.producer)
    seek_uncommitted_to_start()
    mql = AsyncMqlStore(s.redis_url, s.redis_prefix, s.redis_retry_max, on_error=metrics.redis_errors.inc)
    metrics.rules_info.labels(rules.version).set(1)
    metrics.build_info.labels(_version()).set(1)

    def tid(source_topic: str, partition: int) -> str:
        """The transactional id Faust uses for this source partition (TransactionManager's format)."""
        return f"{app.conf.id}-{app.assignor.group_for_topic(source_topic)}-{partition}"

    class PartitionMoved(Exception):
        """The partition went to another worker mid-envelope; its new owner processes the envelope."""

    async def send_tx(topic: str, key: str, value: bytes, partition: int, transactional_id: str,
                      headers: list | None = CE_HEADERS, first: bool = False, source: int | None = None) -> None:
        """To `partition` of `topic`, in the transaction of source partition `source` (default: the
        same number), which commits with that partition's input offsets.

        Only the first send of an envelope may start a new transaction and retry: later, the lost
        transaction may hold this envelope's earlier sends.
        """
        for attempt in (1, 2) if first else (2,):
            try:
                await app.producer.send(topic, key.encode(), value, partition, None, headers,
                                        transactional_id=transactional_id)
                return
            except ProducerFenced as err:
                fatal = err
                break
            except (IllegalOperation, ProducerSendError) as err:
                # A rebalance ended the transaction (or dropped its producer) under us.
                fatal = err
                if TP(topics.accounts, partition if source is None else source) not in app.consumer.assignment():
                    raise PartitionMoved() from None  # never touch a producer we do not own
                if attempt == 1:
                    await app.producer.maybe_begin_transaction(transactional_id)
        # Fenced, or still unusable: part of this envelope may be in a lost transaction. Restart clean;
        # a restart reads again from the committed offsets, so nothing is lost or sent twice.
        log.critical("transaction for partition %d lost (%s); exiting for a clean restart", partition, fatal)
        os._exit(70)

    async def send_now(topic: str, key: bytes | None, value: bytes, partition: int | None,
                       headers: list | None = None) -> None:
        """Outside any transaction, and wait for the ack (the DLQ: at-least-once)."""
        fut = await app.producer.send(topic, key, value, partition, None, headers)
        await fut

    commit_lock = asyncio.Lock()
    changelog = f"{s.app_id}-accounts-changelog"
    clocks_changelog = f"{s.app_id}-clocks-changelog"
    users_changelog = f"{s.app_id}-users-changelog"
    detector = Detect(engine, topics, accounts.data, clocks.data, mql, users=users.data, partitions=P)
    open_clocks: dict[int, int] = {}  # partition -> handoffs awaiting a response (pql_sla_open_handoffs)
    processed: dict[int, int] = {}    # partition -> offset after the last envelope published (lag, ingest pacing)

    @app.agent(accounts_topic, concurrency=1)
    async def detect(stream):
        guard_commits(app.consumer, commit_lock)
        acking = guard_skips(app.consumer, topics.accounts)
        async for ev in stream.noack().events():
            p = ev.message.partition
            t = tid(topics.accounts, p)
            result = await detector.process(ev.value, p)  # phase 1: no sends; may wait for Redis
            for key, raw, reason, detail in result.dead:  # at-least-once, like every dead letter
                metrics.events_invalid.labels(reason).inc()
                await send_now(topics.dlq, key.encode(), raw, None, dlq_headers(
                    ev.message.topic, p, ev.message.offset, reason, detail))
            # Phase 2: outputs, state and the ack go into partition p's transaction as one unit;
            # a commit cannot slip in between (guard_commits), so a transaction never holds part of
            # an envelope, nor an envelope without its input offset.
            async with commit_lock:
                bodies = {account: state.model_dump_json().encode() for account, state in result.states.items()}
                user_bodies = {key: u.model_dump_json().encode() for key, u in result.users.items()}
                sends = [(topic, key, value, CE_HEADERS, p) for topic, key, value in result.outputs]
                sends += [(changelog, json.dumps(account), body, None, p) for account, body in bodies.items()]
                sends += [(users_changelog, json.dumps(key), body, None, p) for key, body in user_bodies.items()]
                for q, lines in sorted(result.forward.items()):  # identity's lines for other partitions
                    sends += [(topics.accounts, "", body, None, q) for body in envelope.pack_all(lines)]
                clock_body = None
                if result.clocks_changed:
                    clock_body = json.dumps(result.clocks, separators=(",", ":")).encode()
                    sends.append((clocks_changelog, json.dumps(str(p)), clock_body, None, p))
                wait_body = result.waits.dump() if result.waits_changed else None
                if wait_body is not None:
                    sends.append((clocks_changelog, json.dumps(f"w{p}"), wait_body, None, p))
                try:
                    for n, (topic, key, value, headers, to) in enumerate(sends):
                        await send_tx(topic, key, value, to, t, headers=headers, first=n == 0, source=p)
                except PartitionMoved:
                    log.info("partition %d moved while publishing; its new owner takes the envelope", p)
                    continue
                for account, body in bodies.items():  # memory follows only what went into the transaction
                    accounts.data[account] = body
                    detector.keep(account, body, result.states[account])
                for key, body in user_bodies.items():
                    users.data[key] = body
                if wait_body is not None:
                    clocks.data[f"w{p}"] = wait_body
                if clock_body is not None:
                    clocks.data[str(p)] = clock_body
                    open_clocks[p] = len(result.clocks)
                    metrics.sla_open.set(sum(open_clocks.values()))
                acking.add((ev.message.tp, ev.message.offset))
                ev.ack()
                processed[p] = ev.message.offset + 1
            if any(topic == topics.handoffs for topic, _, _ in result.outputs):
                commit_soon(p)

    soon: dict[int, asyncio.Task] = {}

    def commit_soon(p: int) -> None:
        """A handoff is readable only once its transaction commits: commit p's now, not at the next
        timer tick (the timer still commits everything else every PQL_COMMIT_INTERVAL)."""
        if p in soon:
            return

        async def commit() -> None:
            try:
                await asyncio.sleep(HANDOFF_COMMIT_DELAY)  # handoffs close together share one commit
                await app.consumer.commit(topics={TP(topics.accounts, p)})
            except Exception as err:  # e.g. a rebalance: the timer or the new owner commits
                log.info("early commit of partition %d skipped (%s)", p, err)
            finally:
                del soon[p]

        soon[p] = asyncio.ensure_future(commit())

    @app.timer(s.sla_tick)
    async def sla_tick() -> None:
        """A tick line to each accounts partition we own: SLA clocks are checked in partition order."""
        ingest = getattr(app, "pql_ingest", None)
        if ingest is None:
            return
        owned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == topics.accounts)
        for gone in (open_clocks, processed):
            for p in [p for p in gone if p not in owned]:
                del gone[p]
        ingest.tick(owned, int(time.time() * 1000))

    @app.agent(crm_topic, concurrency=1)
    async def crm(stream):
        async for ev in stream.events():
            try:
                rec = MqlRecord.model_validate_json(ev.value or b"")
            except ValidationError as err:
                detail = problem(err)
                metrics.events_invalid.labels("bad_crm_record").inc()
                await send_now(topics.dlq, ev.key, ev.value or b"", None, dlq_headers(
                    ev.message.topic, ev.message.partition, ev.message.offset, "bad_crm_record", detail))
                continue
            await mql.put(rec)

    @app.task
    async def ingest() -> None:
        conf = {**s.confluent(), "session.timeout.ms": int(s.session_timeout * 1000),
                "heartbeat.interval.ms": int(s.session_timeout * 200)}

        def unpublished() -> dict[int, int]:
            """For the ingest tier's self-clocking: where `detect` is, on the partitions we own."""
            owned = app.consumer.assignment()
            return {p: offset for p, offset in processed.items() if TP(topics.accounts, p) in owned}

        loop = Ingest(conf, f"{s.app_id}-ingest", Router(engine, topics, P), topics, s.ingest_batch,
                      s.ingest_linger, s.ingest_linger_max, unpublished, s.ingest_merge_wait)
        app.pql_ingest = loop
        await loop.run()

    @app.task
    async def alerts() -> None:
        from streams.alerts import Alerts

        while True:  # a failing alert path must not stop detection: restart it, it re-reads what it had not committed
            try:
                await Alerts(s, topics, rules, mql).run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alerts task failed; restarting it in 5 s")
                await asyncio.sleep(5)

    rebalance_started = [time.perf_counter()]

    @app.on_partitions_assigned.connect
    async def on_assigned(sender, assigned, **kwargs) -> None:
        metrics.rebalances.inc()
        rebalance_started[0] = time.perf_counter()
        # Faust (0.15) does not always stop the transactional producers of partitions it loses in an
        # eager rebalance; the new owner fences them, and when a partition comes back Faust reuses the
        # fenced producer. Start every owned partition on a fresh producer: its init fences any other
        # and aborts leftovers (what was acked was committed when the partitions were revoked).
        owned = sorted({tid(topics.accounts, tp.partition) for tp in assigned if tp.topic == topics.accounts})
        async with commit_lock:
            for t in owned:
                try:
                    await app.producer.stop_transaction(t)
                except Exception:  # already stopped, or fenced: replaced below either way
                    pass
                await app.producer.begin_transaction(t)

    @app.on_rebalance_complete.connect
    async def on_recovered(sender, **kwargs) -> None:
        metrics.table_recovery.set(time.perf_counter() - rebalance_started[0])

    @app.timer(0.2)
    async def reread() -> None:
        await reread_skipped(app)

    @app.timer(5.0)
    async def lag() -> None:
        """pql_consumer_lag for the Faust tier: end offset minus what was processed.

        For envelopes, "processed" is the offset after the last one `detect` published (the fetch
        position runs ahead of processing and would hide a backlog); for crm.lifecycle, the position.
        """
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic not in (topics.accounts, topics.crm):
                continue
            try:
                if tp.topic == topics.accounts:
                    position = processed.get(tp.partition) or await consumer.position(tp)
                else:
                    position = await consumer.position(tp)
                end = consumer.highwater(tp)
            except Exception:  # partition moving away mid-read
                continue
            if position is not None and end is not None:
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, end - position))

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/health")
    async def health(web, request):
        return web.json({"status": "ok", "rules_version": rules.version})

    app.pql_topics = topics
    app.pql_table = accounts
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pql-pipeline")
    except PackageNotFoundError:
        return "dev"


def discard_local_state(datadir) -> None:
    """Start RocksDB tables empty: they are rebuilt from their changelogs (read_committed).

    `detect` writes the store when an envelope's sends are in its transaction, before the commit; a
    SIGKILL can leave values there from a transaction that was then aborted. Kept across a restart,
    they would put state ahead of the log (an event marked seen whose handoff was aborted: a lost
    handoff; the SIGKILL test caught it). Only the changelog is trusted, so restarts cost a full
    recovery, as with memory://; what RocksDB still gives is state larger than RAM.
    """
    import shutil

    for tables in datadir.glob("*/tables"):
        shutil.rmtree(tables)
        log.info("discarded local table state in %s (rebuilt from the changelogs)", tables)


def run_worker(settings: Settings, rules: Rules) -> None:
    """Create topics, then run the Faust worker until stopped (SIGTERM/SIGINT)."""
    from streams.topics import ensure_topics

    ensure_topics(settings, Topics.of(settings))
    if settings.store != "memory://":
        discard_local_state(settings.data_dir / settings.app_id)
    app = build(settings, rules)
    worker = faust.Worker(app, loglevel=settings.log_level.upper() if settings.log_level != "warn" else "WARNING",
                          quiet=True)
    worker.execute_from_commandline()

