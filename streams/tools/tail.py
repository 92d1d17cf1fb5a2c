"""`pql tail TOPIC`: print a topic's records, one value per line, as a downstream consumer sees
them (read_committed: records of aborted transactions never show)."""
from __future__ import annotations

import time
from typing import IO


def tail(conf: dict, topic: str, out: IO[str], count: int | None, timeout: float, keys: bool = False) -> int:
    """From the beginning of `topic`, until `count` records or `timeout` seconds with none. Returns
    how many were printed."""
    import uuid

    from confluent_kafka import Consumer

    consumer = Consumer({**conf, "group.id": f"pql-tail-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([topic])
    seen, quiet_since = 0, time.monotonic()
    try:
        while count is None or seen < count:
            m = consumer.poll(0.2)
            if m is None or m.error() is not None:
                if time.monotonic() - quiet_since > timeout:
                    break
                continue
            quiet_since = time.monotonic()
            value = (m.value() or b"").decode("utf-8", "replace")
            out.write((f"{(m.key() or b'').decode('utf-8', 'replace')}\t" if keys else "") + value + "\n")
            out.flush()
            seen += 1
    finally:
        consumer.close()
    return seen
