"""Envelopes: how the ingest tier hands work to the Faust tier (`<app>-accounts`).

One Kafka message carries many lines bound for one partition, so Faust's per-message cost is paid
once per batch, not once per event. A line is one of:

    <account>\\t<event JSON>            a product event
    \\x1er<account>\\t<response JSON>    a sales response (schemas/sales.py)
    \\x1et\\t<ms>                        a tick: the wall clock, for SLA clocks (sent every second)

Keys never contain a tab, a newline or any other control character. The partition of a key is
``crc32(key) % partitions``: the same on every worker and in every client.
"""
from __future__ import annotations

import zlib
from typing import Iterator

EVENT, RESPONSE, TICK = "e", "r", "t"
_MARK = "\x1e"


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def marked(kind: str, key: str) -> str:
    """The key to pack for a line of another kind than EVENT."""
    return key if kind == EVENT else _MARK + kind + key


def tick(ms: int) -> bytes:
    return f"{_MARK}{TICK}\t{ms}".encode()


MAX_BYTES = 512 * 1024  # well under Kafka's default 1 MB message limit


def pack_all(items: list[tuple[str, bytes]], max_bytes: int = MAX_BYTES) -> Iterator[bytes]:
    """Envelopes of at most `max_bytes` each (one oversized line still gets its own), in order."""
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


def unpack(body: bytes) -> Iterator[tuple[str, str, bytes]]:
    """(kind, key, payload) per line."""
    for line in body.split(b"\n"):
        kind = EVENT
        if line[:1] == b"\x1e":
            kind, line = chr(line[1]), line[2:]
        key, _, raw = line.partition(b"\t")
        yield kind, key.decode(), raw


def safe_key(key: str) -> bool:
    return bool(key) and all(c >= " " for c in key)
