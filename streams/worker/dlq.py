"""Dead letters: a rejected input goes to the DLQ topic with its original key and bytes, and headers
saying why and where it came from. At-least-once, outside any transaction."""
from __future__ import annotations

from streams.worker import metrics


def headers(topic: str, partition: int, offset: int, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter record: why it was rejected and where it came from."""
    return [
        ("pql.error.reason", reason.encode()),
        ("pql.error.detail", detail[:500].encode()),
        ("pql.error.topic", topic.encode()),
        ("pql.error.partition", str(partition).encode()),
        ("pql.error.offset", str(offset).encode()),
    ]


class DeadLetters:
    """Dead letters from the Faust tier (its producer, waiting for the ack)."""

    def __init__(self, app, topic: str):
        self.app, self.topic = app, topic

    async def send(self, key: bytes | None, raw: bytes, message, reason: str, detail: str) -> None:
        """`message`: the Faust message the rejected input came in (topic, partition, offset)."""
        metrics.events_invalid.labels(reason).inc()
        fut = await self.app.producer.send(self.topic, key, raw, None, None, headers(
            message.topic, message.partition, message.offset, reason, detail))
        await fut
