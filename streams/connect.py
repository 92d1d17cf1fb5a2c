"""Checks that Kafka and Redis accept our credentials, before anything starts, with errors that name
the setting to fix and never the secret."""
from __future__ import annotations

import logging
import re
import time

from streams.config import Settings


class ConnectError(RuntimeError):
    pass


def redact_url(url: str) -> str:
    """A Redis URL without its password (redis://user:secret@host -> redis://user:***@host)."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def _scrub(text: str, s: Settings) -> str:
    for secret in (s.kafka_sasl_password, s.webhook_secret):
        if secret:
            text = text.replace(secret, "***")
    return text


class _Collect(logging.Handler):
    """librdkafka's log lines, kept (not printed: it repeats an auth failure every 300 ms)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(record.getMessage())


KAFKA_PATIENCE = 60.0  # s `pql worker` waits at start for a broker that does not answer (`check_kafka`)
SAY_WAITING = 15.0  # s after which it says it is still waiting


def check_kafka(s: Settings, timeout: float = KAFKA_PATIENCE) -> None:
    """Connect and read the cluster's metadata; a refused login stops here at once, a broker that
    does not answer after `timeout` seconds too. A worker restarted while its broker restarts (a
    single node takes 15-30 s with 64-partition topics) waits for it: it gave up after 15 s and exited
    (chaos seed 2 at 64 partitions, session 23: a SIGKILL's restart a second before a broker restart)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    logger, seen = logging.getLogger(f"pql.connect.{id(s)}"), _Collect()
    logger.addHandler(seen)
    logger.propagate = False
    errors: list = []
    admin = AdminClient({**s.confluent(), "error_cb": errors.append, "logger": logger})
    start = time.monotonic()
    deadline, said = start + timeout, False
    try:
        while True:
            try:
                admin.list_topics(timeout=1)
                return
            except KafkaException as err:
                errors.append(err.args[0])
            admin.poll(0)  # serves the log lines and error callbacks
            auth = [line for line in seen.lines if "Authentication failed" in line or "SASL authentication" in line]
            if auth:
                raise ConnectError(_scrub(
                    f"Kafka at {s.kafka_bootstrap} refused the login of user {s.kafka_sasl_username!r} (mechanism "
                    f"{s.kafka_sasl_mechanism}); check PQL_KAFKA_SASL_USERNAME, PQL_KAFKA_SASL_PASSWORD and "
                    f"PQL_KAFKA_SASL_MECHANISM: {auth[-1].split(': ', 1)[-1]}", s))
            if time.monotonic() > deadline:
                break
            if not said and time.monotonic() > start + SAY_WAITING:
                said = True
                logging.getLogger("pql.connect").warning(
                    "Kafka at %s does not answer yet (PQL_KAFKA_BOOTSTRAP); waiting up to %.0f s", s.kafka_bootstrap, timeout)
    finally:
        logger.removeHandler(seen)
    detail = str(errors[-1]) if errors else "no answer"
    raise ConnectError(_scrub(f"cannot reach Kafka at {s.kafka_bootstrap} (PQL_KAFKA_BOOTSTRAP, "
                              f"PQL_KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol}): {detail}", s))


def check_redis(s: Settings) -> None:
    """A refused password stops here; Redis merely down does not (the worker waits for it)."""
    import redis

    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as err:
        raise ConnectError(f"Redis at {redact_url(s.redis_url)} refused the login (PQL_REDIS_URL: "
                           f"redis://[user]:password@host:port/db): {err}") from None
    except redis.ResponseError as err:
        if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
            raise ConnectError(f"Redis at {redact_url(s.redis_url)} needs a password (PQL_REDIS_URL: "
                               "redis://:password@host:port/db)") from None
        raise
    except redis.ConnectionError:
        pass
    finally:
        client.close()
