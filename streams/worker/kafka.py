"""Small helpers around the Kafka clients: polling confluent-kafka from asyncio, and the Faust
broker credentials for PQL_KAFKA_SECURITY_PROTOCOL."""
from __future__ import annotations

import asyncio
import ssl

import faust

from streams.config import Settings


async def poll(consumer, n: int, wait: float) -> list:
    """Up to n messages: what is buffered, else wait up to `wait` s in a thread (the loop stays free)
    for the first one. (consume(n, wait) would wait for n messages or the whole `wait`.)"""
    msgs = consumer.consume(n, timeout=0)
    if not msgs:
        msgs = await asyncio.get_running_loop().run_in_executor(None, consumer.consume, 1, wait)
        if msgs and n > 1:
            msgs += consumer.consume(n - 1, timeout=0)
    return msgs


def partitions_named(partitions) -> str:
    """'topic [0, 2]; other [1]' for a log line ('nothing' when empty)."""
    by: dict[str, list[int]] = {}
    for tp in partitions:
        by.setdefault(tp.topic, []).append(tp.partition)
    return "; ".join(f"{topic} {sorted(ps)}" for topic, ps in sorted(by.items())) or "nothing"


def faust_credentials(s: Settings):
    """Faust's credentials for the configured security protocol (None for PLAINTEXT)."""
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
