"""Envelopes: how the ingest tier hands events to the Faust tier.

One Kafka message carries many events bound for one partition, so Faust's per-message cost is paid
once per batch, not once per event. Body: lines of ``<key>\\t<event JSON>``, where key is the account
id (accounts topic) or the user key (identity topic). Keys never contain a tab or a newline.
The partition of a key is ``crc32(key) % partitions``: the same on every worker and in every client.
"""
from __future__ import annotations

import zlib
from typing import Iterator


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


MAX_BYTES = 512 * 1024  # well under Kafka's default 1 MB message limit


def pack_all(items: list[tuple[str, bytes]], max_bytes: int = MAX_BYTES) -> Iterator[bytes]:
    """Envelopes of at most `max_bytes` each (one oversized event still gets its own), in order."""
    chunk: list[bytes] = []
    size = 0
    for k, raw in items:
        line = k.encode() + b"\t" + raw
        if chunk and size + len(line) + 1 > max_bytes:
            yield b"\n".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
    if chunk:
        yield b"\n".join(chunk)


def unpack(body: bytes) -> Iterator[tuple[str, bytes]]:
    for line in body.split(b"\n"):
        key, _, raw = line.partition(b"\t")
        yield key.decode(), raw


def safe_key(key: str) -> bool:
    return "\t" not in key and "\n" not in key and bool(key)
