"""One helper shared by the worker, the tools and the benchmarks (confluent-kafka producers)."""
from __future__ import annotations


def produce(producer, topic: str, value: bytes, **kw) -> None:
    """`Producer.produce`, serving delivery reports while librdkafka's local queue is full."""
    while True:
        try:
            producer.produce(topic, value, **kw)
            return
        except BufferError:
            producer.poll(0.01)
