"""Validation and routing of one input message, for the ingest tier: an event becomes the lines of
detectors/identity.dispatch, each for the <app>-accounts partition that owns its key; a sales response
goes to its account's partition; what fails validation becomes a reject (dead letter) with its reason.
"""
from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from pydantic import ValidationError

from detectors import identity
from detectors.clock import check_future
from detectors.engine import Engine
from schemas.events import InvalidEvent, parse_event
from schemas.sales import SalesResponse, problem
from streams.topics import Topics
from streams.worker import envelope, metrics


@dataclass
class Batch:
    """What one batch of input turns into."""

    envelopes: dict[tuple[str, int], list[tuple[str, bytes]]] = field(default_factory=lambda: defaultdict(list))
    rejects: list[tuple[object, str, str]] = field(default_factory=list)  # (message, reason, detail)
    consumed: Counter = field(default_factory=Counter)  # event type -> valid events (one metrics call per batch)
    # group calls' LINK lines bound for another partition than their account's: (account's partition,
    # account, call, slot, LINK's partition); once they are acked, a LINKED line tells the account where
    links: list[tuple[int, str, str, str, int]] = field(default_factory=list)


def _field(kind: str, key: str) -> str:
    """The input field a line's key comes from (for a reject's detail)."""
    if kind == identity.EVENT:
        return "groupId"
    return "userId" if key.startswith("u:") else "anonymousId"


class Router:
    """Splits events into lines for their partitions.

    Shortcut: the group calls this router has routed are remembered (`links`, per `u:` key, at most
    MAX_USERS keys), and an event of a user they resolve (detectors/identity.resolve, the function
    the user's partition runs) goes straight to its account's partition, in input order, instead of
    through the user's partition. Only a user in several accounts can resolve differently from a
    call not yet seen here, as it can on the user's partition (docs/semantics.md).
    """

    MAX_USERS = 200_000

    def __init__(self, engine: Engine, topics: Topics, partitions: int, max_bytes: int = 65536,
                 max_future: int = 3_600_000, clock=lambda: int(time.time() * 1000)):
        self.engine, self.topics, self.partitions, self.max_bytes = engine, topics, partitions, max_bytes
        self.max_future, self.clock = max_future, clock  # wrong device clocks (detectors/clock.py)
        self.hold = engine.rules.hold
        self.links: dict[str, tuple] = {}  # user key -> ((ms, account), ...) by time

    def _shortcut(self, kind: str, key: str, arg) -> tuple[str, str, object]:
        if kind == identity.LINK and key.startswith("u:"):
            links = self.links.pop(key, ())  # re-inserted last: the dict's order is least recently linked first
            link = (arg[1], sys.intern(arg[0]))  # (tuples, one string per account: ~1/3 less memory than lists)
            if link not in links:
                links = tuple(sorted((*links, link)))[-identity.MAX_LINKS:]
            self.links[key] = links
            if len(self.links) > self.MAX_USERS:
                del self.links[next(iter(self.links))]
        elif kind == identity.USER and key in self.links:
            account = identity.resolve(self.links[key], arg.ms, self.hold)
            if account is not None:
                return identity.EVENT, account, arg
        return kind, key, arg

    def route(self, raw: bytes, batch: Batch, msg: object = None) -> None:
        parsed = self.parse(raw, batch, msg)
        if parsed is not None:
            self.route_event(*parsed, batch, msg)

    def parse(self, raw: bytes, batch: Batch, msg: object = None) -> tuple[object, bytes] | None:
        """(The event, the bytes it travels as), or None (and a reject in the batch). An event whose
        device clock was ahead (detectors/clock.py) travels with its corrected timestamp."""
        if self._too_large(raw, batch, msg):
            return None
        try:
            event = parse_event(raw)
            if check_future(event, self.clock(), self.max_future):
                metrics.events_clock_corrected.inc()
                raw = event.model_dump_json(by_alias=True).encode()
        except InvalidEvent as bad:
            batch.rejects.append((msg, bad.reason, bad.detail))
            return None
        batch.consumed[event.type] += 1
        return event, raw

    def wanted(self, event) -> bool:
        """Can the event lead to a line (detectors/identity.dispatch)? Others are dropped here."""
        return event.type in ("group", "identify", "alias") or self.engine.relevant(event)

    def route_event(self, event, raw: bytes, batch: Batch, msg: object = None) -> None:
        lines, why_not = identity.dispatch(event, self.engine.relevant)
        if why_not == identity.UNATTRIBUTED:
            metrics.events_unattributed.inc()
        for kind, key, arg in lines:
            keys = [key] + ([arg[0]] if kind in (identity.LINK, identity.JOIN) else [])
            if not all(envelope.safe_key(k) for k in keys):
                batch.rejects.append((msg, "invalid_field",
                                      f"field {_field(kind, key)!r}: empty, or a tab, newline or control character in it"))
                return
        if b"\n" in raw:  # pretty-printed input: envelopes carry one event per line
            raw = event.model_dump_json(by_alias=True).encode()
        for kind, key, arg in map(lambda line: self._shortcut(*line), lines):
            p = envelope.partition_of(key, self.partitions)
            if kind == identity.LINK and (home := envelope.partition_of(arg[0], self.partitions)) != p:
                arg = (arg[0], arg[1], [*arg[2], 1])  # (flagged: the account will learn where it is)
                batch.links.append((home, arg[0], arg[2][0], arg[2][1], p))
            line = (envelope.marked(kind, key), raw) if kind in (identity.EVENT, identity.USER) else envelope.encode(
                kind, key, arg)
            batch.envelopes[(self.topics.accounts, p)].append(line)

    def _too_large(self, raw: bytes, batch: Batch, msg: object) -> bool:
        if len(raw) <= self.max_bytes:
            return False
        batch.rejects.append((msg, "too_large", f"{len(raw):,} bytes; the limit is PQL_MAX_EVENT_BYTES "
                                                f"({self.max_bytes:,})"))
        return True

    def route_response(self, raw: bytes, batch: Batch, msg: object = None) -> SalesResponse | None:
        """The response, routed; or None (and a reject in the batch)."""
        if self._too_large(raw, batch, msg):
            return None
        try:
            r = SalesResponse.model_validate_json(raw)
        except ValidationError as err:
            batch.rejects.append((msg, "bad_response", problem(err)))
            return None
        if not envelope.safe_key(r.account_id):
            batch.rejects.append((msg, "bad_response", "account_id: a control character in it"))
            return None
        if b"\n" in raw:
            raw = json.dumps(json.loads(raw), separators=(",", ":")).encode()
        p = envelope.partition_of(r.account_id, self.partitions)
        batch.envelopes[(self.topics.accounts, p)].append((envelope.marked(envelope.RESPONSE, r.account_id), raw))
        return r
