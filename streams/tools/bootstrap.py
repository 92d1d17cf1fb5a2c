"""`pql bootstrap`: seed the account tables from a history file with new rules, so that a milestone
added (or changed) sees the past (docs/operations.md "Changing rules").

1. The history is read whole and run in event-time order, `(timestamp, messageId)`, whatever order
   the file is in (an export sorted by account is the common case: read as it is, `lateness` would
   drop the events of every account whose history starts behind the one before it). It runs through
   the replay engine (streams/tools/replay.py), the same core the worker runs.
2. Each account starts from its sales history in the current `<app>-accounts-changelog` (its
   handoffs, their responses and stages), so the cooldown holds: nothing handed off is handed off
   again. Everything else in the state (milestones, group calls) is rebuilt from the history. MQL
   states are read from Redis when an account qualifies, as the worker does (one owner).
3. What the new rules decide is flagged `backfill` (decided now about the past: no alert, no SLA
   clock) and published with the new states in **one Kafka transaction**: the account states to the
   changelog, the handoffs and suppressions to `pql.handoffs` / `pql.signals`. A crash half way
   aborts it: readers (read_committed: the workers' recovery, downstream consumers) see the old
   state or the new one, never a mix.

The workers must be stopped (their consumer group empty: checked), and the history must hold every
event up to where they stopped. Then start them with the new rules (`PQL_RULES`). User states,
SLA clocks and waiting decisions are left as they are.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from typing import IO, Callable

from detectors.engine import Engine
from schemas.events import InvalidEvent, parse_event
from schemas.formats import readable, versioned
from schemas.state import AccountState
from streams.config import Settings
from streams.mqlstore import MqlStore
from streams.topics import Topics
from streams.tools.replay import Replay, Summary
from streams.worker import envelope


class BootstrapError(Exception):
    pass


@dataclass
class Result:
    summary: Summary
    accounts: int       # account states written
    kept_sales: int     # of them, accounts whose sales history came from the current tables
    outputs: int        # handoffs and suppressions published
    seconds: float


def in_time_order(lines: list[bytes]) -> tuple[list[int], int]:
    """Indexes of the lines by event time (ties by messageId, then file order); lines that do not
    parse keep their place at the front (replay reports them). Returns (order, lines that parsed)."""
    keyed, bad = [], []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            e = parse_event(raw)
            keyed.append((e.ms, e.messageId, i))
        except InvalidEvent:
            bad.append(i)
    keyed.sort()
    return bad + [i for _, _, i in keyed], len(keyed)


def current_sales(conf: dict, topic: str, timeout: float = 30.0) -> dict[str, AccountState]:
    """{account: a state holding only its sales history}, from the accounts changelog (read_committed,
    to its end)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    c = Consumer({**conf, "group.id": f"pql-bootstrap-{time.time_ns()}", "enable.auto.commit": False,
                  "isolation.level": "read_committed", "enable.partition.eof": True})
    try:
        meta = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return {}
        parts = list(meta.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        latest: dict[str, bytes | None] = {}
        pending, deadline = set(parts), time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for m in c.consume(10_000, timeout=0.2):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                        continue
                    raise BootstrapError(f"reading {topic}: {m.error()}")
                latest[json.loads(m.key())] = m.value()
        if pending:
            raise BootstrapError(f"reading {topic}: partitions {sorted(pending)} did not end within {timeout:.0f} s")
    finally:
        c.close()
    out = {}
    for account, body in latest.items():
        if body:
            state = AccountState.model_validate_json(readable(body, f"the state of account {account!r}"))
            if state.sales is not None:
                out[account] = AccountState(account_id=account, sales=state.sales)
    return out


def _topics(conf: dict) -> list[str]:
    from confluent_kafka.admin import AdminClient

    return list(AdminClient(conf).list_topics(timeout=30).topics)


def workers_running(conf: dict, app_id: str, patience: float = 60.0) -> int:
    """Members of the workers' consumer groups (Faust's, the app id, and the ingest tier's). A broker
    still loading its group coordinator is asked again."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(conf)  # (kept alive until the answers: a dropped client never answers)
    groups = [app_id, f"{app_id}-ingest"]
    deadline = time.monotonic() + patience
    while True:
        try:
            found = admin.describe_consumer_groups(groups, request_timeout=30)
            return sum(len(found[g].result(timeout=40).members) for g in groups)
        except KafkaException as err:
            code = err.args[0].code() if err.args and hasattr(err.args[0], "code") else None
            if code not in (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE) \
                    or time.monotonic() > deadline:
                raise BootstrapError(f"could not tell whether workers run (describing groups {groups}: {err})")
            time.sleep(1)


def run(history: list[bytes], engine: Engine, settings: Settings, now: int, err: IO[str],
        crash_after: int | None = None, log: Callable[[str], None] = lambda s: None) -> Result:
    started = time.perf_counter()
    topics = Topics.of(settings)
    conf = settings.confluent()
    changelog = f"{settings.app_id}-accounts-changelog"
    members = workers_running(conf, settings.app_id)
    if members:
        raise BootstrapError(f"{members} worker(s) of PQL_APP_ID {settings.app_id!r} are running: stop them first "
                             "(the tables must not change while bootstrap rebuilds them)")
    have = set(_topics(conf))
    missing = [t for t in (changelog, topics.handoffs, topics.signals) if t not in have]
    if missing:
        raise BootstrapError(f"no topic {', '.join(missing)}: start a worker once with this PQL_APP_ID (it creates "
                             "them), stop it, then bootstrap")
    seeded = current_sales(conf, changelog)
    log(f"{len(seeded):,} accounts have a sales history in {changelog}")
    order, valid = in_time_order(history)
    log(f"{len(history):,} history lines, {valid:,} events, in event-time order")
    out = io.StringIO()
    r = Replay(engine, MqlStore(settings.redis_url, settings.redis_prefix), processed_at=now)  # (read at decisions)
    r.states.update(seeded)
    for i in order:
        r.feed(i + 1, history[i], out, err)
    r.release(None, out, err)
    outputs = [json.loads(x) for x in out.getvalue().splitlines()]
    records = []
    written = {a: s for a, s in r.states.items() if a not in seeded or s.newest}  # (the history's accounts)
    for account, state in written.items():
        p = envelope.partition_of(account, settings.partitions)
        body = versioned(state.model_dump_json(exclude_defaults=True).encode())
        records.append((changelog, p, json.dumps(account).encode(), body, None))
    for ev in outputs:
        topic = topics.handoffs if ev["type"] == "pql.handoff" else topics.signals
        records.append((topic, envelope.partition_of(ev["subject"], settings.partitions), ev["subject"].encode(),
                        json.dumps(ev, separators=(",", ":")).encode(), [("content-type", b"application/cloudevents+json")]))
    publish(conf, settings.app_id, records, crash_after, log)
    return Result(r.summary, len(written), len(seeded.keys() & written.keys()), len(outputs), time.perf_counter() - started)


def publish(conf: dict, app_id: str, records: list, crash_after: int | None, log: Callable[[str], None]) -> None:
    """Every record in one transaction (transactional id `<app>-bootstrap`: a second bootstrap fences
    a first one still running, and aborts what it left open)."""
    from confluent_kafka import Producer

    producer = Producer({**conf, "transactional.id": f"{app_id}-bootstrap", "transaction.timeout.ms": 900_000,
                         "linger.ms": 50, "message.max.bytes": 8 * 1024 * 1024, "compression.type": "lz4"})
    producer.init_transactions(60)
    producer.begin_transaction()
    log(f"writing {len(records):,} records in one transaction")
    for n, (topic, partition, key, value, headers) in enumerate(records):
        if crash_after is not None and n == crash_after:
            producer.flush(30)  # what was sent is in the log, uncommitted: a crash now must leave no trace
            log(f"crashing after {n} records, before the commit (--crash-after)")
            os._exit(3)
        while True:
            try:
                producer.produce(topic, value, key=key, partition=partition, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
    producer.commit_transaction(300)
    log("committed")
