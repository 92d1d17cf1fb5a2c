"""Dead letters: a rejected input goes to the DLQ topic with its original key and bytes (at most the
first KEEP bytes: a record near Kafka's size limit plus our headers would not fit), and headers saying
why and where it came from. At-least-once, outside any transaction: after a crash a rejection can be
written again, with the same `pql.error.id` (where it came from: topic/partition/offset, and its
place among the rejections found in that record), so consumers drop repeats by it.
Why not exactly once: the ingest tier's producer is not transactional (a transaction per input batch
would cost the ingest tier its speed), and its input offsets are committed after its writes.
"""
from __future__ import annotations

from streams.worker import metrics


KEEP = 64 * 1024  # bytes of a rejected record the DLQ keeps; `pql.error.size` says how long it was


def record(value: bytes | None, topic: str, partition: int, offset: int, reason: str,
           detail: str, nth: int | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of a dead-letter record: why it was rejected and where it came from.
    `nth`: its place among several rejections found in one record (an envelope's)."""
    value = value or b""
    rid = f"{topic}/{partition}/{offset}" + (f"/{nth}" if nth is not None else "")
    headers = [
        ("pql.error.id", rid.encode()),
        ("pql.error.reason", reason.encode()),
        ("pql.error.detail", detail[:500].encode("utf-8", "replace")),
        ("pql.error.topic", topic.encode()),
        ("pql.error.partition", str(partition).encode()),
        ("pql.error.offset", str(offset).encode()),
    ]
    if len(value) > KEEP:
        headers.append(("pql.error.size", str(len(value)).encode()))
        value = value[:KEEP]
    return value, headers


class DeadLetters:
    """Dead letters from the Faust tier (its producer, waiting for the ack)."""

    def __init__(self, app, topic: str):
        self.app, self.topic = app, topic

    async def send(self, key: bytes | None, raw: bytes, message, reason: str, detail: str,
                   nth: int | None = None) -> None:
        """`message`: the Faust message the rejected input came in (topic, partition, offset); `nth`:
        the rejection's place among those found in it."""
        metrics.events_invalid.labels(reason).inc()
        value, headers = record(raw, message.topic, message.partition, message.offset, reason, detail, nth)
        fut = await self.app.producer.send(self.topic, key, value, None, None, headers)
        await fut
