"""Envelopes: how the ingest tier hands work to the Faust tier (`<app>-accounts`).

One Kafka message carries many lines bound for one partition, so Faust's per-message cost is paid
once per batch, not once per event. A line is one of:

    <account>\\t<event JSON>            a product event
    \\x1eu<user key>\\t<event JSON>     an event to attribute through its user (detectors/identity.py)
    \\x1el<user key>\\t[account, ms, [call, slot]]  the user's group call (JSON; or null for the call);
                                      [call, slot, 1]: the account's partition will learn where this line is
                                      (a LINKED line), so a MARK with nothing released may be left out
    \\x1em<account>\\t[call, slot, ms]     that user key of the group call has released its held events
    \\x1ek<account>\\t[call, slot, p, o]   that slot's LINK line is in partition p at or before offset o: once
                                      p reports it has committed past o, the slot has released (p -1: wait
                                      for its MARK, the LINK went on to another key)
    \\x1ej<anonymous key>\\t<user key>\\t<ms>  identify/alias: the anonymous key is that user
    \\x1er<account>\\t<response JSON>    a sales response (schemas/sales.py)
    \\x1et\\t<ms>                        a tick: the wall clock, for SLA clocks and waiting decisions
    \\x1ew<partition>\\t<tick ms>\\t<ms>   that partition's stream time at its tick (the barrier, barrier.py)
    \\x1ei<partition>\\t<tick ms>\\t<ms>   how far the ingest tier has routed that product.events partition
    \\x1es<partition>\\t<tick ms>\\t<ms>   how far it has routed that sales.responses partition (answer times)
    \\x1ec*\\t<tick ms>\\t<p>:<offset>,...  those accounts partitions have processed and committed their logs
                                      below those offsets (one line for all of a worker's partitions)
                                      (in the first three, <ms> IDLE: nothing pending, which counts as <tick ms>;
                                      they travel on <app>-progress, packed the same way: progress.py)
    \x1ef<writer>\t<offset>\t<p>:<h>,...  on <app>-progress only: the reports below that offset of it
                                      count for partition p once p has processed its log up to h

Account lines go to the account's partition, user lines to the user key's: `detect` forwards what a
user line leads to (an attributed event, a moved held event) to the partition that owns it.

Keys never contain a tab, a newline or any other control character. The partition of a key is
``crc32(key) % partitions``: the same on every worker and in every client.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Iterator

from detectors.identity import EVENT, JOIN, LINK, USER
from schemas.events import parse_event

RESPONSE, TICK, WATERMARK, INPUT, ANSWERS, FENCE, OFFSET, LINKED = "r", "t", "w", "i", "s", "f", "c", "k"
REPORTS = (WATERMARK, INPUT, ANSWERS, OFFSET)  # the barrier's lines
IDLE = 2**62  # a partition with nothing pending: no constraint
_MARK = "\x1e"
_q = json.encoder.encode_basestring_ascii  # a JSON string, as json.dumps writes it


def partition_of(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


def marked(kind: str, key: str) -> str:
    """The key to pack for a line of another kind than EVENT."""
    return key if kind == EVENT else _MARK + kind + key


def encode(kind: str, key: str, arg) -> tuple[str, bytes]:
    """An identity line (detectors/identity.py) as (marked key, payload), for `pack_all`."""
    if kind in (EVENT, USER):
        payload = arg.model_dump_json(by_alias=True).encode()
    elif kind == JOIN:  # (user key, ms)
        payload = f"{arg[0]}\t{arg[1]}".encode()
    elif kind == LINK:  # (account, ms, call): the bytes of json.dumps(arg, separators=(",", ":")), built faster
        account, ms, call = arg
        at = "null" if call is None else f"[{_q(call[0])},{_q(call[1])}{',1' if len(call) > 2 else ''}]"
        payload = f"[{_q(account)},{int(ms)},{at}]".encode()
    elif kind == LINKED:  # (call, slot, partition, offset)
        call, slot, p, o = arg
        payload = f"[{_q(call)},{_q(slot)},{int(p)},{int(o)}]".encode()
    else:  # MARK (call, slot, ms), likewise
        call, slot, ms = arg
        payload = f"[{_q(call)},{_q(slot)},{int(ms)}]".encode()
    return marked(kind, key), payload


def decode(kind: str, payload: bytes):
    """The line's argument back: an event (raises InvalidEvent), (user key, ms), (account, ms, call),
    (call, slot, ms), (call, slot, partition, offset)."""
    if kind in (EVENT, USER):
        return parse_event(payload)
    if kind == JOIN:
        key, _, ms = payload.decode().rpartition("\t")
        return key, int(ms)
    arg = json.loads(payload)
    if kind == LINK:
        account, ms, call = arg
        return str(account), int(ms), call
    if kind == LINKED:
        call, slot, p, o = arg
        return str(call), str(slot), int(p), int(o)
    call, slot, ms = arg
    return str(call), str(slot), int(ms)


def tick(ms: int) -> bytes:
    return f"{_MARK}{TICK}\t{ms}".encode()


def told(kind: str, partition: int, tick_ms: int, ms: int) -> tuple[str, bytes]:
    """A barrier line (for `pack_all`): how far a partition is at a tick. WATERMARK: an accounts
    partition's stream time, sent to every other one; INPUT: how far the ingest tier has routed a
    product.events partition, sent to every accounts partition. `ms` IDLE: nothing pending."""
    return marked(kind, str(partition)), f"{tick_ms}\t{ms}".encode()


def told_value(payload: bytes) -> tuple[int, int]:
    """A barrier line's payload back: (tick ms, ms)."""
    tick, _, ms = payload.partition(b"\t")
    return int(tick), int(ms)


def _numbered(first: int, by_partition: dict[int, int]) -> bytes:
    """`<first>\\t<p>:<n>,...`: the payload of fence and offsets lines."""
    return f"{first}\t{','.join(f'{p}:{n}' for p, n in by_partition.items())}".encode()


def _numbered_value(payload: bytes) -> tuple[int, dict[int, int]]:
    first, _, pairs = payload.partition(b"\t")
    return int(first), {int(p): int(n) for p, _, n in (e.partition(b":") for e in pairs.split(b",") if e)}


def offsets(tick_ms: int, committed: dict[int, int]) -> tuple[str, bytes]:
    """The offset below which each of a worker's partitions has committed its log, one line (for
    `pack_all`, on `<app>-progress`)."""
    return marked(OFFSET, "*"), _numbered(tick_ms, committed)


def offsets_value(payload: bytes) -> list[tuple[int, tuple[int, int]]]:
    """An offsets line's payload back: [(partition, (tick ms, offset))]."""
    tick, committed = _numbered_value(payload)
    return [(p, (tick, o)) for p, o in committed.items()]


def fence(writer: str, offset: int, ends: dict[int, int]) -> tuple[str, bytes]:
    """A fence line (for `pack_all`, streams/worker/barrier.py): `writer` names the worker that read
    `<app>-progress` up to `offset`, then each partition's high watermark (`ends`)."""
    return marked(FENCE, writer), _numbered(offset, ends)


def fence_value(payload: bytes) -> tuple[int, dict[int, int]]:
    """A fence line's payload back: (offset, {partition: high watermark})."""
    return _numbered_value(payload)


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


_CONTROL = re.compile(r"[\x00-\x1f]")


def safe_key(key: str) -> bool:
    """Not empty, no control character (a tab or newline would break the line format)."""
    return bool(key) and _CONTROL.search(key) is None
