"""Topic names and creation. All our names get PQL_TOPIC_PREFIX.

in:  product.events (Segment JSON), crm.lifecycle (MQL state changes), sales.responses (accept/reject);
     or the team's own existing topics (PQL_EVENTS_TOPICS, PQL_CRM_TOPICS, PQL_RESPONSES_TOPICS, one
     or several each): read as they are, never created or altered; a missing one stops startup
out: pql.handoffs, pql.signals, pql.events.dlq, pql.alerts.retry (alerts that failed, retried later)
internal (per app id): <app>-accounts (envelopes, see streams/worker/envelope.py), <app>-progress (one
partition: the workers' progress reports, streams/worker/progress.py), and the changelogs of the
tables (streams/worker/tables.py): <app>-accounts-changelog, <app>-users-changelog,
<app>-clocks-changelog (no PQL_TOPIC_PREFIX: Faust names them). Created here, before the worker
starts, with the config Faust would give them (CHANGELOG_CONFIG): Faust declares them as its tables
start, and the group's first assignment then came before a just-created changelog was in the
metadata: a new 64-partition app exited (`eos.tables_follow_sources`, session 21).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from streams.config import Settings


INPUT_SETTINGS = {"events": "PQL_EVENTS_TOPICS", "crm": "PQL_CRM_TOPICS", "responses": "PQL_RESPONSES_TOPICS"}
PROGRESS_CONFIG = {"retention.ms": str(3_600_000), "segment.ms": str(600_000)}
# A changelog record may be this large (Kafka's default is 1 MB). The engine's caps keep an account
# well under 1 MB (docs/semantics.md, bounded state); the margin is for a partition's SLA clocks,
# which grow with its open handoffs (~90 bytes each). The producer's request size matches it.
MAX_VALUE_BYTES = 8 * 1024 * 1024
# Compaction only cleans closed segments, and a restarted worker reads its changelogs from the start:
# with Kafka's 1 GB default, a busy partition's whole history stays in the active segment and every
# recovery reads all of it. Applies to changelog topics the worker creates (docs/operations.md).
SEGMENT_BYTES = 64 * 1024 * 1024
CHANGELOG_EXTRA = {"max.message.bytes": str(MAX_VALUE_BYTES), "segment.bytes": str(SEGMENT_BYTES)}
CHANGELOG_CONFIG = {"cleanup.policy": "compact", **CHANGELOG_EXTRA}  # (Faust adds compact to a table's)
TABLES = ("accounts", "users", "clocks")
SERVED_POLL = 0.1  # s between ListOffsets rounds while new partitions are not served yet (`served`)
TOPIC_SPAN = 100_000  # input report keys: topic k of a list, partition p -> k * TOPIC_SPAN + p


def names(value: str | None) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'), in order, each once."""
    return tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))


@dataclass(frozen=True)
class Topics:
    events: tuple[str, ...]      # input topics (one or several)
    crm: tuple[str, ...]
    responses: tuple[str, ...]
    handoffs: str
    signals: str
    dlq: str
    alerts_retry: str
    accounts: str
    progress: str
    theirs: frozenset = frozenset()  # input topics set by the user: never created
    changelogs: tuple[str, ...] = ()  # the tables' changelogs, as TABLES

    @classmethod
    def of(cls, s: Settings) -> "Topics":
        t = s.topic
        inputs, theirs = {}, set()
        for kind, default in (("events", "product.events"), ("crm", "crm.lifecycle"), ("responses", "sales.responses")):
            own = names(getattr(s, f"{kind}_topics"))
            inputs[kind] = own or (t(default),)
            theirs.update(own)
        return cls(**inputs, handoffs=t("pql.handoffs"), signals=t("pql.signals"), dlq=t("pql.events.dlq"),
                   alerts_retry=t("pql.alerts.retry"), accounts=t(f"{s.app_id}-accounts"), progress=t(f"{s.app_id}-progress"),
                   theirs=frozenset(theirs), changelogs=tuple(changelog(s.app_id, t) for t in TABLES))

    def index(self, topic: str, partition: int) -> int:
        """The key an input partition is reported under (the barrier, streams/worker/detect.py): the
        partition number for the first topic of its list, as with one topic."""
        of = self.events if topic in self.events else self.responses
        return of.index(topic) * TOPIC_SPAN + partition

    @property
    def copartitioned(self) -> tuple[str, ...]:
        """Topics that must have exactly PQL_PARTITIONS partitions (outputs share the source partition)."""
        return (self.accounts, self.handoffs, self.signals)


def changelog(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


class TopicError(RuntimeError):
    pass


def broker_replication(s: Settings) -> int:
    """The replication factor for topics Faust creates (its changelogs: Faust's setting takes no -1):
    PQL_REPLICATION, else the broker's `default.replication.factor`."""
    if s.replication is not None:
        return s.replication
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient(s.confluent())
    problems = []
    try:
        brokers = list(admin.list_topics(timeout=15).brokers)
    except Exception as err:
        brokers, problems = [], [repr(err)]
    for broker in brokers:  # the first that answers (one may be down: chaos --cluster found that)
        res = ConfigResource(ConfigResource.Type.BROKER, str(broker))
        try:
            configs = admin.describe_configs([res], request_timeout=10)[res].result(timeout=15)
            return int(configs["default.replication.factor"].value)
        except Exception as err:  # a broker down, or a managed service that does not show its configs
            problems.append(f"broker {broker}: {err!r}")
    raise TopicError(f"cannot read the brokers' default.replication.factor ({'; '.join(problems)}); set "
                     "PQL_REPLICATION (3 on a production cluster)")


def served(admin, topics: dict[str, int], deadline: float) -> None:
    """Until every partition of these topics (name -> partition count) answers ListOffsets, or the
    deadline. A topic just created is in the metadata, with leaders, before its partitions are served:
    at 256 partitions the tables' recovery was refused NOT_LEADER_OR_FOLLOWER for its changelogs, took
    longer than the session timeout, and the worker rejoined with every producer in a bad state
    (idle at 18 % of a core; session 21). Best effort: past the deadline, Faust retries on its own."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    waiting = [TopicPartition(name, p) for name, n in topics.items() for p in range(n)]
    while waiting and time.monotonic() < deadline:
        try:
            futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in waiting}, request_timeout=10)
        except Exception:
            time.sleep(SERVED_POLL)
            continue
        left = []
        for tp, f in futures.items():
            try:
                if f.result(timeout=15).offset < 0:
                    left.append(tp)
            except Exception:
                left.append(tp)
        waiting = left
        if waiting:
            time.sleep(SERVED_POLL)


FEW = 4  # partitions of the low-volume topics the worker creates (`ensure_topics`)


def ensure_topics(s: Settings, topics: Topics) -> tuple[int, int]:
    """Create our missing topics; refuse to start when an input topic of the user's is missing, or a
    co-partitioned topic has the wrong count. Returns how many partitions the event topics and the
    response topics have (each list summed)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(s.confluent())
    try:
        existing = admin.list_topics(timeout=15).topics
    except Exception as err:  # KafkaException: broker unreachable
        raise TopicError(f"cannot reach Kafka at {s.kafka_bootstrap} (PQL_KAFKA_BOOTSTRAP): {err}") from None
    absent = [name for name in sorted(topics.theirs) if name not in existing]
    if absent:
        kind = next(k for k in INPUT_SETTINGS if absent[0] in getattr(topics, k))
        raise TopicError(f"{INPUT_SETTINGS[kind]}: topic {absent[0]!r} does not exist on {s.kafka_bootstrap}; "
                         "the worker reads your input topics as they are and never creates one: create it, or "
                         "fix the name")
    quiet = {*topics.crm, topics.dlq, *topics.responses, topics.alerts_retry}
    ours = [*topics.events, *quiet, *topics.copartitioned]
    missing = [NewTopic(name, min(s.partitions, FEW) if name in quiet else s.partitions, s.replication_factor)
               for name in dict.fromkeys(ours) if name not in existing and name not in topics.theirs]
    if topics.progress not in existing:  # a few small records a second, read only by live workers
        missing.append(NewTopic(topics.progress, 1, s.replication_factor, config=PROGRESS_CONFIG))
    missing += [NewTopic(name, s.partitions, s.replication_factor, config=CHANGELOG_CONFIG)
                for name in topics.changelogs if name not in existing]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=30).items():
            try:
                fut.result(timeout=30)
            except Exception as err:
                if "TOPIC_ALREADY_EXISTS" not in str(err):
                    raise TopicError(f"cannot create topic {name}: {err}") from None
    deadline = time.monotonic() + 30
    created = [t.topic for t in missing]
    while True:  # a topic just created can show 0 partitions until the metadata catches up (then: `served`)
        meta = admin.list_topics(timeout=15).topics
        counts = {name: len(meta[name].partitions) if name in meta else 0
                  for name in (*topics.copartitioned, *topics.changelogs)}
        each = [len(meta[t].partitions) if t in meta else 0 for t in (*topics.events, *topics.responses)]
        inputs = (sum(each[:len(topics.events)]), sum(each[len(topics.events):]))
        if (all(counts.values()) and all(each) and all(n in meta for n in created)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    served(admin, {n: len(meta[n].partitions) for n in created if n in meta}, time.monotonic() + 60)
    for name, n in counts.items():
        if n != s.partitions:
            raise TopicError(f"topic {name} has {n} partitions but PQL_PARTITIONS is {s.partitions}; "
                             "outputs are co-partitioned with the state, so these must match")
    return inputs[0], inputs[1]
