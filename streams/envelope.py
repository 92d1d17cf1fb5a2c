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


def pack(items: list[tuple[str, bytes]]) -> bytes:
    return b"\n".join(k.encode() + b"\t" + raw for k, raw in items)


def unpack(body: bytes) -> Iterator[tuple[str, bytes]]:
    for line in body.split(b"\n"):
        key, _, raw = line.partition(b"\t")
        yield key.decode(), raw


def safe_key(key: str) -> bool:
    return "\t" not in key and "\n" not in key and bool(key)
