"""PQL_* settings: a bad value names its variable and never shows a secret."""
import pytest

from streams.config import SettingsError, load_settings
from streams.connect import redact_url


@pytest.mark.parametrize("var,value", [
    ("PQL_WEBHOOK_URL", "ftp://x"),                               # a URL: may carry credentials
    ("PQL_SLACK_WEBHOOK_URL", "hooks.slack.com/services/T0/B0/s3cr3t-token"),
])
def test_bad_values_of_secret_bearing_settings_are_hidden(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert var in str(err.value) and "(hidden)" in str(err.value) and value not in str(err.value)


def test_other_bad_values_are_shown(monkeypatch):
    monkeypatch.setenv("PQL_PARTITIONS", "many")
    with pytest.raises(SettingsError, match=r"PQL_PARTITIONS: .* \(got 'many'\)"):
        load_settings()


def test_redis_urls_are_shown_without_their_password():
    assert redact_url("redis://:s3cr3t@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redact_url("rediss://app:s3cr3t@host/1") == "rediss://app:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_an_instance_id_gives_both_tiers_static_membership(monkeypatch, tmp_path):
    from streams.worker.app import make_app

    monkeypatch.setenv("PQL_INSTANCE_ID", "pql-worker-0")
    monkeypatch.setenv("PQL_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert make_app(s).conf.consumer_group_instance_id == "pql-worker-0"
    monkeypatch.delenv("PQL_INSTANCE_ID")
    assert make_app(load_settings()).conf.consumer_group_instance_id is None
    monkeypatch.setenv("PQL_INSTANCE_ID", "two words")
    with pytest.raises(SettingsError, match="PQL_INSTANCE_ID"):
        load_settings()


def test_input_topics_are_lists_of_existing_topic_names(monkeypatch):
    from streams.topics import Topics

    monkeypatch.setenv("PQL_TOPIC_PREFIX", "dev.")
    monkeypatch.setenv("PQL_EVENTS_TOPICS", " rs.track, rs.identify ,rs.group,rs.track")
    monkeypatch.setenv("PQL_RESPONSES_TOPICS", "crm.answers")
    t = Topics.of(load_settings())
    assert t.events == ("rs.track", "rs.identify", "rs.group")  # as written, no prefix, each once
    assert t.crm == ("dev.crm.lifecycle",) and t.responses == ("crm.answers",)  # unset: ours
    assert t.theirs == {"rs.track", "rs.identify", "rs.group", "crm.answers"}
    assert t.index("rs.track", 3) == 3 and t.index("rs.group", 1) == 200_001 and t.index("crm.answers", 2) == 2
    monkeypatch.setenv("PQL_CRM_TOPICS", "hubspot lifecycle")
    with pytest.raises(SettingsError, match=r"PQL_CRM_TOPICS: comma-separated Kafka topic names"):
        load_settings()


def test_replication_is_the_brokers_default_unless_set(monkeypatch):
    assert load_settings().replication is None and load_settings().replication_factor == -1  # KIP-464
    monkeypatch.setenv("PQL_REPLICATION", "3")
    assert load_settings().replication_factor == 3
    monkeypatch.setenv("PQL_REPLICATION", "0")
    with pytest.raises(SettingsError, match="PQL_REPLICATION"):
        load_settings()


def test_the_worker_creates_its_low_volume_topics_with_few_partitions(monkeypatch):
    """ensure_topics: the CRM, responses, alerts-retry and dead-letter topics it creates get at most
    topics.FEW partitions (every partition is fetched by some consumer, idle or not: at 256 they were
    a fifth of an idle worker's CPU, session 23); the others PQL_PARTITIONS."""
    from types import SimpleNamespace

    import confluent_kafka.admin

    from streams import topics as topics_module
    from streams.topics import Topics, ensure_topics

    made = {}

    class Admin:
        def __init__(self, conf):
            pass

        def list_topics(self, timeout):
            return SimpleNamespace(topics={n: SimpleNamespace(partitions=dict.fromkeys(range(k))) for n, k in made.items()})

        def create_topics(self, new, operation_timeout):
            done = {}
            for t in new:
                made[t.topic] = t.num_partitions
                done[t.topic] = SimpleNamespace(result=lambda timeout: None)
            return done

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", Admin)
    monkeypatch.setattr(topics_module, "served", lambda admin, topics, deadline: None)
    monkeypatch.setenv("PQL_PARTITIONS", "64")
    s = load_settings()
    t = Topics.of(s)
    assert ensure_topics(s, t) == (64, topics_module.FEW)
    assert {made[n] for n in (*t.crm, *t.responses, t.alerts_retry, t.dlq)} == {topics_module.FEW}
    assert {made[n] for n in (*t.events, *t.copartitioned, *t.changelogs)} == {64} and made[t.progress] == 1


def test_a_broker_that_does_not_answer_is_waited_for_then_named(monkeypatch, caplog):
    """streams.connect.check_kafka: a worker started while its broker restarts waits (saying so after
    SAY_WAITING s), then exits naming the setting; it gave up after 15 s (chaos seed 2, session 23)."""
    import logging
    import socket

    import pytest

    from streams import connect

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PQL_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    monkeypatch.setattr(connect, "SAY_WAITING", 0.5)
    assert connect.KAFKA_PATIENCE >= 60
    with caplog.at_level(logging.WARNING, logger="pql.connect"):
        with pytest.raises(connect.ConnectError, match="cannot reach Kafka at 127.0.0.1.*PQL_KAFKA_BOOTSTRAP"):
            connect.check_kafka(load_settings(), timeout=2.0)
    assert "does not answer yet" in caplog.text
