"""The live worker (`pql worker`): assembles one Faust app from the parts in this package.

    product.events ──┐  ingest.py (task, or its own process: ingest_process.py; route.py validates,
                     │  merge.py orders by event time)
    sales.responses ─┴─> <app>-accounts envelopes (envelope.py)
    <app>-accounts ────> detect.py (agent) ──> publish.py: pql.handoffs, pql.signals, table
                         changelogs and the input offset, in one transaction (eos.py)
    crm.lifecycle ─────> crm.py (agent) ──> Redis MQL store (streams/mqlstore.py)
    pql.handoffs ──────> alerts.py (task) ──> Slack / signed webhook
    progress.py (timer): progress reports (the barrier) and tick lines for SLA clocks and waiting
    decisions; monitor.py serves /metrics and /health; tables.py lists the
    tables; dlq.py writes dead letters. Every agent runs with concurrency 1 (faust-streaming #606).
"""
from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faust

from detectors.engine import Engine
from schemas.rules import Rules
from streams.config import Settings, alert_max_age_ms
from streams.mqlstore import AsyncMqlStore
from streams.topics import MAX_VALUE_BYTES, Topics, broker_replication, ensure_topics
from streams.worker import alerts, crm, detect, eos, ingest, ingest_process, metrics, restore
from streams.worker.dlq import DeadLetters
from streams.worker.kafka import faust_credentials
from streams.worker.monitor import Monitor
from streams.worker.publish import Publisher
from streams.worker.progress import Progress
from streams.worker.tables import Tables

log = logging.getLogger("pql.worker")
# Ticks of event time a partition may decide past the lowest report it counts: a busy partition's
# report tells what it had counted a tick before (streams/worker/progress.py), one more tick to run.
SLACK_TICKS = 3
# Bytes of one producer batch (aiokafka's default, 16 KB, is one round trip per 16 KB: aiokafka sends
# one batch per partition at a time, and a commit's table writes for a partition, often hundreds of
# KB, waited for tens of them in turn: most of a commit's time at 64 partitions, issue 25). Under
# the broker's default 1 MB message limit.
BATCH_BYTES = 512 * 1024


def make_app(s: Settings) -> faust.App:
    """The Faust app and its settings: exactly-once, our topics' partitions, the web port."""
    (s.data_dir / s.app_id).mkdir(parents=True, exist_ok=True)
    return faust.App(
        s.app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        broker_credentials=faust_credentials(s),
        store=s.store,
        datadir=str(s.data_dir / s.app_id),
        processing_guarantee="exactly_once",
        producer_acks=-1,
        producer_max_request_size=MAX_VALUE_BYTES,  # a large changelog value (streams/topics.py)
        producer_max_batch_size=BATCH_BYTES,
        topic_replication_factor=s.replication or 1,
        topic_partitions=s.partitions,
        broker_commit_interval=s.commit_interval,
        broker_commit_every=100_000,
        consumer_auto_offset_reset="earliest",
        web_port=s.web_port,
        web_bind=s.web_host,
        web_host=s.web_host,
        stream_wait_empty=False,
        # Faust buffers up to this many fetched messages per partition (default 4096). An envelope
        # holds up to 512 KB and a hot account's changelog value ~450 KB: 4096 of them was the
        # chaos run's 1.5 GB worker. 32 envelopes are thousands of events, plenty to stay busy.
        stream_buffer_maxsize=32,
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=s.session_timeout / 5,
        consumer_group_instance_id=s.instance_id,  # None: dynamic membership
        # A partition that becomes active is read from its changelog's start whatever a standby
        # held (streams/worker/restore.py, quickly): standbys would only cost CPU and memory.
        table_standby_replicas=0,
    )


def build(settings: Settings, rules: Rules, inputs: tuple[int, int] | None = None) -> faust.App:
    """`inputs`: the partitions of product.events and sales.responses, each of which every partition
    hears from before deciding and before an SLA clock breaches (the barrier, streams/worker/detect.py)."""
    s, topics, engine = settings, Topics.of(settings), Engine(rules, alert_max_age_ms(settings.alert_max_age))
    app = make_app(s)
    raw = dict(key_serializer="raw", value_serializer="raw")
    envelopes = app.topic(topics.accounts, key_type=bytes, value_type=bytes, partitions=s.partitions, **raw)
    tables = Tables.create(app, s.partitions)
    eos.install(app, topics.accounts)
    restore.Restore(app, s.confluent(), [tables.accounts, tables.users, tables.clocks]).install()
    eos.tables_follow_sources(app, topics.accounts, list(topics.changelogs))
    mql = AsyncMqlStore(s.redis_url, s.redis_prefix, s.redis_retry_max, on_error=metrics.redis_errors.inc)
    metrics.rules_info.labels(rules.version).set(1)
    metrics.build_info.labels(_version()).set(1)
    dead = DeadLetters(app, topics.dlq)

    tx = eos.Transactions(app, topics.accounts)
    tx.outputs = [topics.accounts, topics.handoffs, topics.signals, topics.dlq, *topics.changelogs]
    detector = detect.Detect(engine, topics, tables.accounts.data, tables.clocks.data, mql,
                             users=tables.users.data, partitions=s.partitions, slack=int(SLACK_TICKS * 1000 * s.sla_tick),
                             inputs=inputs[0] if inputs else None, answers=inputs[1] if inputs else None)
    publisher = Publisher(tx, topics, tables, detector)
    app.agent(envelopes, name="detect", concurrency=1)(detect.Agent(detector, publisher, tx, dead).run)
    app.agent(app.topic(*topics.crm, **raw), name="crm", concurrency=1)(crm.Agent(mql, dead).run)
    tx.rollback, tx.flush, tx.held = publisher.rollback, publisher.flush, publisher.held
    app.on_partitions_revoked.connect(tx.on_revoked)
    app.on_partitions_assigned.connect(tx.on_assigned)
    app.timer(0.2, name="pql.reread")(eos.reread_skipped)

    feed = (ingest_process.Task(s, rules, topics, publisher.unpublished) if s.ingest_process
            else ingest.Task(s, engine, topics, publisher.unpublished))
    app.task(feed.run)
    app.pql_feed = feed  # (/ready: the ingest tier is polling)
    progress = Progress(app, s, topics, detector, publisher, feed)
    tx.noted = progress.noted
    app.pql_progress = progress  # (/ready, and the tick watchdog of Monitor)
    app.timer(s.sla_tick, name="pql.tick")(progress.tick)
    app.task(alerts.Task(s, topics, rules, mql).run)
    Monitor(app, (topics.accounts, *topics.crm), rules.version, publisher.processed).install()
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pql-pipeline")
    except PackageNotFoundError:
        return "dev"


def discard_local_state(datadir: Path) -> None:
    """Start RocksDB tables empty: they are rebuilt from their changelogs (read_committed).

    `detect` writes the store when an envelope's sends are in its transaction, before the commit; a
    SIGKILL can leave values there from a transaction that was then aborted. Kept across a restart,
    they would put state ahead of the log (an event kept in state whose handoff was aborted: a lost
    handoff; the SIGKILL test caught it). Only the changelog is trusted, so restarts cost a full
    recovery, as with memory://; what RocksDB still gives is state larger than RAM.
    """
    for tables in datadir.glob("*/tables"):
        shutil.rmtree(tables)
        log.info("discarded local table state in %s (rebuilt from the changelogs)", tables)


def run_worker(settings: Settings, rules: Rules) -> None:
    """Create topics, then run the Faust worker until stopped (SIGTERM/SIGINT)."""
    inputs = ensure_topics(settings, Topics.of(settings))
    settings = settings.model_copy(update={"replication": broker_replication(settings)})  # (for Faust's topics)
    if settings.store != "memory://":
        discard_local_state(settings.data_dir / settings.app_id)
    app = build(settings, rules, inputs)
    level = settings.log_level.upper() if settings.log_level != "warn" else "WARNING"
    make_worker(app, level, settings.shutdown_timeout).execute_from_commandline()


def make_worker(app: faust.App, level: str, shutdown_timeout: float = 30.0) -> faust.Worker:
    worker = faust.Worker(app, loglevel=level, quiet=True)
    # Blocking Kafka calls (the ingest tier's and the alerts task's polls, commits, lag reads) run in
    # the loop's default executor: Python's default of cores + 4 threads (6 here) was all taken by them
    worker.loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="pql"))
    eos.stop_within(worker, shutdown_timeout)  # a stop is bounded, even with Kafka gone
    # Faust's terminal spinner (at warn and error) sets the root logger to DEBUG: every debug call
    # in aiokafka (one per send) then builds a record for nothing (5 % of a loaded worker's CPU).
    worker.spinner = None
    return worker
