"""The live worker's code path without Kafka, for upgrade tests: the ingest tier's Router makes the
envelopes, `Detect` and `Publisher` run them partition by partition, identity's forwarded lines go to
their partitions' queues, and a transaction that records what is sent stands in for Kafka. What it
keeps is what the topics would hold: changelog records (last value per key), outputs, envelopes.

tests/fixtures/upgrade/make.py runs it at a release to write that release's changelogs and
envelopes; tests/unit/test_upgrade.py reads them with the current code.
"""
from __future__ import annotations

import asyncio
import json
from collections import deque

from detectors.engine import Engine
from schemas.rules import Rules
from streams.config import Settings
from streams.topics import Topics
from streams.worker import envelope
from streams.worker.detect import Detect
from streams.worker.publish import Publisher
from streams.worker.route import Batch, Router
from streams.worker.tables import Tables

APP = "app"
TOPICS = Topics.of(Settings())
TABLES = ("accounts", "users", "clocks")
NOW = 4_102_444_800_000  # the ingest tier's wall clock (2100-01-01): no event is ahead of it


class NoMql:
    async def get(self, account):
        return None, 0.0


class Store(dict):
    """A table's memory, as `Publisher` writes it (`.data`)."""

    @property
    def data(self) -> "Store":
        return self


class RecordingTx:
    """Every send, in order: (topic, key, value, headers, partition)."""

    frozen = False

    def __init__(self):
        self.sent: list[tuple] = []

    async def send_all(self, sends, source, opens=True):
        self.sent.extend(sends)

    def commit_soon(self, partition):
        pass

    def catching_up(self, behind, interval):
        pass


class Pipeline:
    def __init__(self, rules: Rules, partitions: int = 4, changelog: dict | None = None):
        """`changelog`: {(table, key): value bytes} to start from (a restarted worker's recovery)."""
        self.partitions = partitions
        engine = Engine(rules)
        self.tables = Tables(Store(), Store(), Store(), app_id=APP)
        for (table, key), value in (changelog or {}).items():
            getattr(self.tables, table)[key] = value
        self.tx = RecordingTx()
        self.detector = Detect(engine, TOPICS, self.tables.accounts, self.tables.clocks, NoMql(),
                               users=self.tables.users, partitions=partitions)
        self.publisher = Publisher(self.tx, TOPICS, self.tables, self.detector)
        self.router = Router(engine, TOPICS, partitions, clock=lambda: NOW)
        self.offsets = [0] * partitions
        self.queues = [deque() for _ in range(partitions)]

    def route(self, lines: list[bytes]) -> list[tuple[int, bytes]]:
        """The envelopes the ingest tier makes of these input lines, as (partition, body), in order."""
        batch = Batch()
        for line in lines:
            self.router.route(line, batch)
        out = []
        for (_, p), items in sorted(batch.envelopes.items()):
            out += [(p, body) for body in envelope.pack_all(items)]
        return out

    def run(self, envelopes: list[tuple[int, bytes]]) -> None:
        """Process the envelopes and everything they lead to; then commit (the held writes are sent)."""
        for p, body in envelopes:
            self.queues[p].append(body)
        while any(self.queues):
            for p, q in enumerate(self.queues):
                while q:
                    self._one(p, q.popleft())
            self._commit()

    def tick(self, ms: int) -> None:
        self.run([(p, envelope.tick(ms)) for p in range(self.partitions)])

    def _one(self, p: int, body: bytes) -> None:
        r = asyncio.run(self.detector.process(body, p, self.offsets[p]))
        assert asyncio.run(self.publisher.publish(r, p, self.offsets[p]))
        self.offsets[p] += 1

    def _commit(self) -> None:
        start = len(self.tx.sent)
        asyncio.run(self.publisher.flush(None))
        for topic, _, value, _, q in self.tx.sent[start:]:
            if topic == TOPICS.accounts:
                self.queues[q].append(value)

    def outputs(self) -> list[tuple[str, str, bytes]]:
        return [(topic, key, value) for topic, key, value, _, _ in self.tx.sent
                if topic in (TOPICS.handoffs, TOPICS.signals)]

    def changelog(self) -> dict[tuple[str, str], bytes]:
        """The last value of each key in each changelog, as {(table, key): value}."""
        last = {}
        for topic, key, value, _, _ in self.tx.sent:
            for table in TABLES:
                if topic == self.tables.changelog(table):
                    last[(table, json.loads(key))] = value
        return last
