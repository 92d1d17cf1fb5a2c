"""Topic names and creation. All names get PQL_TOPIC_PREFIX.

in:  product.events (Segment JSON), crm.lifecycle (MQL state changes), sales.responses (accept/reject)
out: pql.handoffs, pql.signals, pql.events.dlq, pql.alerts.retry (alerts that failed, retried later)
internal (per app id): <app>-accounts (envelopes, see streams/worker/envelope.py); Faust adds the changelogs
of the tables: <app>-accounts-changelog, <app>-users-changelog, <app>-clocks-changelog.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from streams.config import Settings


@dataclass(frozen=True)
class Topics:
    events: str
    crm: str
    handoffs: str
    signals: str
    dlq: str
    responses: str
    alerts_retry: str
    accounts: str

    @classmethod
    def of(cls, s: Settings) -> "Topics":
        t = s.topic
        return cls(events=t("product.events"), crm=t("crm.lifecycle"), handoffs=t("pql.handoffs"),
                   signals=t("pql.signals"), dlq=t("pql.events.dlq"),
                   responses=t("sales.responses"), alerts_retry=t("pql.alerts.retry"),
                   accounts=t(f"{s.app_id}-accounts"))

    @property
    def copartitioned(self) -> tuple[str, ...]:
        """Topics that must have exactly PQL_PARTITIONS partitions (outputs share the source partition)."""
        return (self.accounts, self.handoffs, self.signals)


class TopicError(RuntimeError):
    pass


def ensure_topics(s: Settings, topics: Topics) -> tuple[int, int]:
    """Create missing topics; refuse to start when a co-partitioned topic has the wrong count.
    Returns how many partitions product.events and sales.responses have."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(s.confluent())
    try:
        existing = admin.list_topics(timeout=15).topics
    except Exception as err:  # KafkaException: broker unreachable
        raise TopicError(f"cannot reach Kafka at {s.kafka_bootstrap} (PQL_KAFKA_BOOTSTRAP): {err}") from None
    wanted = [topics.events, topics.crm, topics.dlq, topics.responses, topics.alerts_retry, *topics.copartitioned]
    missing = [NewTopic(name, s.partitions, s.replication) for name in wanted if name not in existing]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=30).items():
            try:
                fut.result(timeout=30)
            except Exception as err:
                if "TOPIC_ALREADY_EXISTS" not in str(err):
                    raise TopicError(f"cannot create topic {name}: {err}") from None
    deadline = time.monotonic() + 15
    while True:  # a topic just created can show 0 partitions until the metadata catches up
        meta = admin.list_topics(timeout=15).topics
        counts = {name: len(meta[name].partitions) if name in meta else 0 for name in topics.copartitioned}
        inputs = tuple(len(meta[t].partitions) if t in meta else 0 for t in (topics.events, topics.responses))
        if (all(counts.values()) and all(inputs)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name, n in counts.items():
        if n != s.partitions:
            raise TopicError(f"topic {name} has {n} partitions but PQL_PARTITIONS is {s.partitions}; "
                             "outputs are co-partitioned with the state, so these must match")
    return inputs[0], inputs[1]
