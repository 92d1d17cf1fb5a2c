"""Publishing an envelope's result (phase 2 of `detect`): outputs, state and the input offset in one
transaction, so they commit together or not at all.

Outputs are sent at once; the table writes wait for the commit (`flush`, called under the
publishing lock just before it) and a key written by several envelopes in one transaction is sent
once, with its last value, as Kafka Streams' record cache does. A hot account's state (the
simulator's whale: 440 KB) was sent with every envelope that touched it, 10-20 times a second, three
times over on a cluster (cluster chaos, session 17). Identity's forwarded lines wait for the commit
too, gathered per destination partition: sent per envelope, each envelope became up to one envelope
per other partition (64 partitions at 5,000 events/s: 1,620 envelopes a second in all, then 827;
issue 25). Nothing reads them before the commit either way (read_committed), and their order per
destination is kept.

Every write for an envelope of partition p goes to partition p of a co-partitioned topic (the table
changelogs, pql.handoffs, pql.signals), or to another <app>-accounts partition (identity's forwarded
lines), through p's transactional producer (streams/worker/eos.py). Tables in memory follow only
what went into the transaction. docs/exactly-once.md has the whole design.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from faust.types import TP

from schemas import formats
from schemas.formats import unversioned, versioned
from streams.topics import Topics
from streams.worker import envelope, metrics
from streams.worker.eos import PartitionMoved, Transactions
from streams.worker.tables import Tables

if TYPE_CHECKING:
    from streams.worker.detect import Detect, Result

log = logging.getLogger("pql.worker")
CE_HEADERS = [("content-type", b"application/cloudevents+json")]


class Publisher:
    def __init__(self, tx: Transactions, topics: Topics, tables: Tables, detector: "Detect"):
        self.tx, self.topics, self.tables, self.detector = tx, topics, tables, detector
        self.processed: dict[int, int] = {}    # partition -> offset after the last envelope published
        self.reported: dict[int, tuple[int, int]] = {}  # partition -> that envelope's Result.reported
        self.open_clocks: dict[int, int] = {}  # partition -> handoffs awaiting a response
        self.tick_cache: dict[int, tuple] = {}  # partition -> (waits, clocks values, waiting?, earliest due)
        self.unsent: dict[int, dict[tuple[str, str], bytes]] = {}  # partition -> table writes for its commit
        self.forwards: dict[int, dict[int, list]] = {}  # partition -> destination -> lines for its commit
        self.opened: set[int] = set()  # partitions whose open transaction holds our sends
        self.lost: set[int] = set()  # partitions whose held writes could not be sent (they moved): to roll back

    def sends(self, r: "Result", p: int) -> tuple[list, dict, dict, dict, bytes | None, bytes | None]:
        """The result's outputs, as (topic, key, value, headers, partition); its table writes,
        {(changelog, key): value}; and the table values. States are JSON without the fields at their
        defaults (read back as those defaults)."""
        accounts = {a: versioned(state.model_dump_json(exclude_defaults=True).encode()) for a, state in r.states.items()}
        users = {key: versioned(u.model_dump_json(exclude_defaults=True).encode()) for key, u in r.users.items()}
        out = [(topic, key, value, CE_HEADERS, p) for topic, key, value in r.outputs]
        writes = {(self.tables.changelog("accounts"), json.dumps(a)): body for a, body in accounts.items()}
        writes.update({(self.tables.changelog("users"), json.dumps(k)): body for k, body in users.items()})
        clocks = versioned(json.dumps(r.clocks, separators=(",", ":")).encode(), clock_shaped=True) if r.clocks_changed else None
        if clocks is not None:
            writes[(self.tables.changelog("clocks"), json.dumps(str(p)))] = clocks
        waits = self.detector.dump_waits(p, r.waits) if r.waits_changed else None
        if waits is not None:
            writes[(self.tables.changelog("clocks"), json.dumps(f"w{p}"))] = waits
        return out, writes, accounts, users, clocks, waits

    async def publish(self, r: "Result", p: int, offset: int) -> bool:
        """Send the result of the envelope at `offset` of partition p. False if p moved meanwhile
        (its new owner processes the envelope). The caller holds `tx.lock` and acks on True."""
        out, writes, accounts, users, clocks, waits = self.sends(r, p)
        try:
            if self.tx.frozen:
                raise PartitionMoved()  # a rebalance is under way (eos.Transactions.on_revoked)
            if out:
                await self.tx.send_all(out, source=p, opens=p not in self.opened)
                self.opened.add(p)
        except PartitionMoved:
            log.info("partition %d moved or is being rebalanced; the envelope is read again by its owner", p)
            return False
        held = self.unsent.setdefault(p, {})
        if held:
            metrics.table_writes_saved.inc(len(held.keys() & writes.keys()))
        held.update(writes)
        forwards = self.forwards.setdefault(p, {})
        for q, lines in r.forward.items():  # identity's lines for other partitions
            forwards.setdefault(q, []).extend(lines)
        t = self.tables
        for account, body in accounts.items():
            t.accounts.data[account] = body
            self.detector.keep(account, body, r.states[account])
        for key, body in users.items():
            t.users.data[key] = body
        if waits is not None:
            t.clocks.data[f"w{p}"] = waits
        if clocks is not None:
            t.clocks.data[str(p)] = clocks
            self.open_clocks[p] = len(r.clocks)
            metrics.sla_open.set(sum(self.open_clocks.values()))
        self.processed[p] = offset + 1
        self.reported[p] = r.reported
        if any(topic == self.topics.handoffs for topic, _, _ in r.outputs):
            self.tx.commit_soon(p)
        return True

    async def flush(self, partitions: set[int] | None) -> None:
        """Send the forwarded lines and table writes held for these partitions (None: all) into their
        transactions: a commit follows at once (eos.guard_commits; the caller holds `tx.lock`). A
        partition that moved is skipped: its transaction is aborted and its memory rolled back
        (`rollback`)."""
        held = self.unsent.keys() | self.forwards.keys()
        for p in sorted(held if partitions is None else partitions & held):
            writes, forwards = self.unsent.pop(p, {}), self.forwards.pop(p, {})
            opens = p not in self.opened
            self.opened.discard(p)
            sends = [(self.topics.accounts, "", body, formats.HEADERS, q)
                     for q, lines in sorted(forwards.items()) for body in envelope.pack_all(lines)]
            sends += [(topic, key, value, None, p) for (topic, key), value in writes.items()]
            if sends:
                try:
                    await self.tx.send_all(sends, source=p, opens=opens)
                except PartitionMoved:
                    log.info("partition %d moved before its commit; its new owner reads its envelopes again", p)
                    self.lost.add(p)

    def held(self) -> set[int]:
        """Partitions whose table values in memory are not all in their transaction (eos.Transactions.on_revoked)."""
        held = {p for p, writes in self.unsent.items() if writes} | {p for p, lines in self.forwards.items() if lines}
        return held | self.lost

    def rollback(self, partitions: set[int]) -> None:
        """Memory goes back to the log for these partitions: their open transaction is about to be
        aborted (eos.Transactions.on_revoked). Their table values are dropped and Faust's recovery
        forgets how far it had read their changelogs, so the coming assignment reads them again."""
        d = self.detector
        dropped = self.tables.forget(partitions, lambda key: envelope.partition_of(key, d.partitions))
        recovery = self.tx.app.tables.recovery
        for table in ("accounts", "users", "clocks"):
            for p in partitions:
                recovery.revoke(TP(self.tables.changelog(table), p))
        for p in partitions:  # read again from the committed offset: what it was told may be ahead of that
            self.unsent.pop(p, None)
            self.lost.discard(p)
            self.forwards.pop(p, None)
            self.opened.discard(p)
            for kept in (d.stream, d.busy, self.processed, self.reported):
                kept.pop(p, None)
            d.heard.forget(p)
        d.unkeep()
        log.info("rolled back partitions %s: %d values dropped", sorted(partitions), dropped)

    def needs_tick(self, p: int, now: int) -> bool:
        """Has partition p anything a tick decides: accounts waiting (rules `settle`, the barrier),
        or an SLA clock due? (An idle partition gets no tick: it costs nothing.)"""
        data = self.tables.clocks.data
        waits, clocks = data.get(f"w{p}"), data.get(str(p))
        seen = self.tick_cache.get(p)
        if seen is None or seen[0] != waits or seen[1] != clocks:
            accounts = json.loads(waits).get("accounts") if waits else None
            due = min((at for at, _ in unversioned(json.loads(clocks)).values()), default=None) if clocks else None
            seen = self.tick_cache[p] = (waits, clocks, bool(accounts), due)
        return seen[2] or (seen[3] is not None and seen[3] <= now)

    def unpublished(self) -> dict[int, int]:
        """Where `detect` is (next offset to publish) on the partitions this worker owns."""
        owned = self.tx.owned()
        return {p: offset for p, offset in self.processed.items() if p in owned}

    def forget(self, owned: set[int]) -> None:
        """Partitions this worker no longer owns leave the progress and the open-clocks gauge."""
        for gone in (self.open_clocks, self.processed, self.reported, self.tick_cache, self.unsent, self.forwards):
            for p in [p for p in gone if p not in owned]:
                del gone[p]
        self.opened.intersection_update(owned)  # (back later on a fresh producer: its first send opens)
