"""Configuration: every setting is a `PQL_*` environment variable (pydantic-settings)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = ROOT / "examples" / "rules.yaml"
TOPIC_LIST = r"^\s*[A-Za-z0-9._-]{1,249}\s*(,\s*[A-Za-z0-9._-]{1,249}\s*)*$"  # Kafka topic names, comma-separated


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PQL_", extra="ignore", env_ignore_empty=True)

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "pql:"
    rules: Path = DEFAULT_RULES
    app_id: str = Field(default="pql-pipeline", pattern=r"^[A-Za-z0-9._-]+$")
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    # the input topics: unset, ours (product.events, crm.lifecycle, sales.responses with PQL_TOPIC_PREFIX,
    # created when missing); set, your own existing topics, comma-separated, read as they are, never created
    events_topics: str | None = None
    crm_topics: str | None = None
    responses_topics: str | None = None
    partitions: int = Field(default=4, ge=1, le=1024)
    replication: int | None = Field(default=None, ge=1, description="replication of the topics the worker creates; "
                                    "unset: the broker's default.replication.factor (KIP-464)")
    web_port: int = Field(default=6066, ge=1, le=65535)
    web_host: str = "127.0.0.1"
    store: str = "memory://"
    data_dir: Path = Path(".stack/worker-data")
    commit_interval: float = Field(default=0.1, gt=0, description="seconds between transaction commits")
    catchup_commit_interval: float = Field(default=1.0, ge=0, description="seconds between timer commits while the "
                                           "owned partitions are far behind their logs (0: always commit_interval)")
    ingest_process: bool = Field(default=False, description="run the ingest tier in a child process (its own core)")
    ingest_batch: int = Field(default=5000, ge=1)
    ingest_linger: float = Field(default=0.01, ge=0, le=1, description="s to gather a batch after its first message")
    ingest_linger_max: float = Field(default=0.25, ge=0, le=5,
                                     description="s a batch may keep gathering while the Faust tier is busy")
    ingest_merge_wait: float = Field(default=0.5, ge=0, le=10,
                                     description="s a partition with unread data but nothing held may hold the time-order merge")
    max_event_bytes: int = Field(default=65536, ge=1024, le=1_000_000,
                                 description="larger input records go to the DLQ as too_large")
    max_future: float = Field(default=3600.0, gt=0, description="s an event may be dated ahead of when it was received "
                              "(its receivedAt, else the ingest clock); beyond: corrected by sentAt, or DLQ `future`")
    shutdown_timeout: float = Field(default=30.0, gt=0, description="s a SIGTERM/SIGINT stop may take; then exit 1")
    session_timeout: float = Field(default=10.0, ge=6, description="s before a silent worker's partitions move")
    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,200}$",
                                    description="static group membership (KIP-345): unique per worker, kept across restarts")
    redis_retry_max: float = Field(default=5.0, gt=0, description="longest wait between Redis retries, s")
    log_level: Literal["debug", "info", "warn", "error"] = "info"
    sla_tick: float = Field(default=1.0, gt=0, le=60, description="s between SLA clock checks")
    # alerts (streams/worker/alerts.py); none configured = no deliveries, handoffs are still indexed for `pql respond`
    slack_webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_secret: str | None = None
    alert_timeout: float = Field(default=5.0, gt=0, description="s per delivery attempt")
    alert_attempts: int = Field(default=3, ge=1, le=10, description="attempts before the retry topic")
    alert_retry_delay: float = Field(default=30.0, gt=0, le=240, description="s before a retry-topic retry")
    # a handoff whose qualifying event is older than this (s) when decided is a backfill: no alert, no SLA clock
    alert_max_age: float = Field(default=86400.0, ge=0, description="s; 0: every handoff is alerted")
    # Kafka security, passed through to both clients
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    @field_validator("events_topics", "crm_topics", "responses_topics")
    @classmethod
    def _topic_list(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(TOPIC_LIST, v):
            raise ValueError("comma-separated Kafka topic names (letters, digits, '.', '_', '-'; at most 249 each)")
        return v

    @field_validator("store")
    @classmethod
    def _known_store(cls, v: str) -> str:
        if v not in ("memory://", "rocksdb://"):
            raise ValueError("use memory:// or rocksdb:// (Faust's RocksDB store, backed by rocksdict: "
                             "pip install 'pql-pipeline[rocksdb]')")
        return v

    @model_validator(mode="after")
    def _secret_with_webhook(self) -> "Settings":
        if self.webhook_url and not self.webhook_secret:
            raise ValueError("PQL_WEBHOOK_SECRET: required when PQL_WEBHOOK_URL is set (requests are signed)")
        return self

    @property
    def replication_factor(self) -> int:
        """For topic creation: PQL_REPLICATION, else -1 (the broker's default, KIP-464)."""
        return self.replication if self.replication is not None else -1

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def confluent(self) -> dict:
        """librdkafka settings for confluent-kafka clients."""
        conf = {"bootstrap.servers": self.kafka_bootstrap, "security.protocol": self.kafka_security_protocol}
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism, "sasl.username": self.kafka_sasl_username,
            "sasl.password": self.kafka_sasl_password, "ssl.ca.location": self.kafka_ssl_cafile,
            "ssl.certificate.location": self.kafka_ssl_certfile, "ssl.key.location": self.kafka_ssl_keyfile,
        }
        conf.update({k: str(v) for k, v in optional.items() if v is not None})
        return conf


class SettingsError(ValueError):
    pass


def load_settings(**overrides) -> Settings:
    """Settings from the environment; a bad value stops with the variable's name."""
    try:
        return Settings(**overrides)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a check across settings names its variables itself
            raise SettingsError(msg) from None
        name = "PQL_" + "_".join(str(p) for p in e["loc"]).upper()
        secret = any(word in name for word in ("SECRET", "PASSWORD", "URL"))  # URLs may hold a password
        shown = "(hidden)" if secret else repr(e.get("input"))
        raise SettingsError(f"{name}: {msg} (got {shown})") from None


def alert_max_age_ms(seconds: float) -> int | None:
    """PQL_ALERT_MAX_AGE for the engine: ms, or None when 0 (no backfill flag)."""
    return int(seconds * 1000) if seconds > 0 else None
