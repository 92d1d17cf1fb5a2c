"""The `detect` agent: each <app>-accounts envelope through the pure core, then published.

Phase 1 (`Detect.process`, no sends) runs the core over the envelope's lines; phase 2
(streams/worker/publish.py) puts what it changed into the partition's transaction.

Identity lines (user, link, join) run on the user states of this partition (detectors/identity.py);
what they lead to for another partition is forwarded to it. Events go through the engine (Redis is
read only when an account qualifies); responses and ticks go through detectors/sales.py. The result
is everything the envelope changes: outputs, account and user states, forwarded lines, the
partition's SLA clocks and waiting decisions, and dead letters.

Decisions are made once the whole envelope is in: a qualification waits in its account's state until
the partition's stream time (the newest event time it has seen) passes it by the rules' `settle`,
and while a group call of its account still expects held events (docs/semantics.md). Which
accounts wait is kept per partition in the clocks table (`w<partition>`).

The barrier: events without `context.groupId` reach their account through their user's partition.
When that partition lags (its worker was killed and it is recovering), its forwarded events would
arrive after the account decided; the same when the product.events partition the user's events are
on lags (its ingest consumer died with the worker) while the account's own events flow. So at each
tick every partition tells the others its stream time (or that it is idle: everything in its log
processed and committed), each ingest tier tells how far it has routed each of its product.events
partitions (or that nothing of it is unread or held), and a partition decides nothing later than
the lowest time it was told plus `slack` (three ticks): it waits for a lagging partition, and only
then. The reports travel on the `<app>-progress` topic (streams/worker/progress.py) and count for a
partition once it has read every line their sources wrote to it before them (streams/worker/barrier.py).
An idle report counts as its tick's wall clock time: idle then, a partition or input partition may
still receive events timed after it (its worker may be killed the next moment, and its last word
must not free the others). What a partition was told is its own, kept in memory. A partition's
report is never past the INPUT reports it counts: an event routed to it but not processed yet (its
worker was killed right after a report) can be older than its stream time; with `inputs` set (the
worker), a partition decides nothing until it has heard from every other partition and every
product.events partition (a restarted worker waits for the next ticks). The barrier changes when a
decision is made, never what it is.

SLA clocks run on the wall clock of the ticks, and an answer timed before its handoff's due time
must stop the clock even when it reaches the partition after the tick that passed the due time (its
sales.responses partition was behind): each ingest tier also tells every partition how far it has
routed each of its sales.responses partitions (ANSWERS lines), and a clock breaches only once
every sales.responses partition is past its due time (idle ones count as their tick).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pydantic import ValidationError

from detectors import identity, sales
from detectors.engine import Engine, Observation, Pending
from detectors.settle import Waiting
from schemas.cloudevents import HANDOFF, STAGE, CloudEvent
from schemas.formats import NewerFormat, check_headers, readable, unversioned, versioned
from schemas.events import InvalidEvent
from schemas.sales import SalesResponse
from schemas.state import AccountState, UserState
from streams.worker import envelope, metrics
from streams.worker.barrier import NOTHING, Reports
from streams.mqlstore import AsyncMqlStore
from streams.topics import Topics
from streams.worker.dlq import DeadLetters
from streams.worker.eos import Transactions
from streams.worker.monitor import Unmoved

log = logging.getLogger("pql.detect")
IDLE = envelope.IDLE  # the cut of an idle tick: everything, except accounts still expecting held events
EXIT_NEWER_FORMAT = 78  # (EX_CONFIG) the exit status of a worker that met a newer format
MAX_LINKS = 20_000  # group-call slots a partition keeps waiting for their LINK line's partition (oldest go)
BARRIER_WARN = 60_000  # ms decisions may wait for a barrier that does not move before the worker names who holds it


@dataclass
class Result:
    outputs: list[tuple[str, str, bytes]] = field(default_factory=list)   # (topic, key, CloudEvent JSON)
    states: dict[str, AccountState] = field(default_factory=dict)
    users: dict[str, UserState] = field(default_factory=dict)
    forward: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)  # partition -> lines for `pack_all`
    clocks: sales.Clocks | None = None                                    # the partition's SLA clocks, once read
    clocks_changed: bool = False
    dead: list[tuple[str, bytes, str, str]] = field(default_factory=list)  # (key, raw, reason, detail)
    raw: dict[str, bytes] = field(default_factory=dict)  # messageId -> the bytes an event line came as
    waits: Waits | None = None                                            # the partition's settle index, once read
    waits_before: dict = field(default_factory=dict)
    links_changed: bool = False
    links_added: bool = False                                             # (`_released` looks at them all again)
    waits_changed: bool = False
    newest: int = 0                                                       # newest event time in the envelope
    barrier: int | None = None                                            # the lowest time other partitions told us
    reported: tuple[int, int] = (0, 0)  # (stream time, `_processed`) after it: what a report tells once it is committed


@dataclass
class Waits:
    """A partition's stream time, the accounts with qualifications waiting (rules `settle`), and the
    group calls' slots waiting for their user key's partition to commit past their LINK line
    (`links`: {(account, call, slot): [partition, offset]}, oldest first; partition -1: wait for the
    slot's MARK). Stored as JSON in the clocks table under key ``w<partition>``."""

    stream: int = 0
    index: Waiting = field(default_factory=Waiting)
    links: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)

    def dump(self) -> bytes:
        d = {"stream": self.stream, "accounts": self.index.accounts}
        if self.links:
            d["links"] = [[*at, *slot] for slot, at in self.links.items()]
        return versioned(json.dumps(d, separators=(",", ":")).encode())

    def copy(self) -> "Waits":
        return Waits(self.stream, Waiting(dict(self.index.accounts)), dict(self.links))


class Detect:
    def __init__(self, engine: Engine, topics: Topics, accounts: Mapping[str, bytes], clocks: Mapping[str, bytes],
                 mql: AsyncMqlStore, now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 cache_bytes: int = 4 << 20, cache_min: int = 1024, users: Mapping[str, bytes] | None = None, partitions: int = 1,
                 slack: int = 2000, inputs: int | None = None, answers: int | None = None):
        self.engine, self.topics, self.accounts, self.clocks, self.mql = engine, topics, accounts, clocks, mql
        self.users = users if users is not None else {}
        self.partitions = partitions
        rules = engine.rules
        self.identity = identity.Users(rules.hold, rules.bound)
        self.now_ms = now_ms  # only for the latency metric; decisions never read it
        self.settle = rules.settle
        self.busy: dict[int, bool] = {}  # partition -> events came since its last tick
        self.stream: dict[int, int] = {}  # partition -> its stream time: the newest event time it has seen
        self.heard = Reports()  # what each partition was told (streams/worker/barrier.py)
        self.slack = slack  # ms of event time a partition may have moved since it told us (the barrier)
        self.inputs = inputs  # product.events partitions to hear from before deciding (None: don't wait)
        self.answers = answers  # sales.responses partitions to hear from before a clock breaches
        # Parsed states of recently active accounts whose JSON is at least `cache_min` bytes, up to
        # `cache_bytes` of JSON, least recently kept out first. A big state is an active account's
        # and costs the most to parse; a small one parses in a few microseconds, and kept parsed it
        # would take ~9 times its JSON in memory for an account that may not come back soon.
        self.warned: dict[int, int] = {}  # partition -> tick of the last "decisions have waited" warning
        self.barrier_still = Unmoved()  # partition -> its barrier, and the tick since when it has not moved
        self.parsed: OrderedDict[str, tuple[bytes, AccountState]] = OrderedDict()
        self.owned: set[int] = set()  # the partitions this worker owned at its last tick (progress.py)
        self.checked: dict[int, object] = {}  # partition -> the reports it counted when `_released` last looked
        self.waits_parsed: dict[int, tuple[bytes, Waits]] = {}  # partition -> its `w<partition>` value, parsed
        self.parsed_bytes, self.cache_bytes, self.cache_min = 0, cache_bytes, cache_min

    def _state(self, r: Result, account: str) -> AccountState | None:
        state = r.states.get(account)
        if state is None:
            stored = self.accounts.get(account)
            if not stored:
                return None
            # A parsed copy is used only if it is exactly what the table holds. It leaves the cache
            # while in use (the core changes it in place) and comes back only when published (`keep`).
            hit = self.unkeep(account)
            state = hit[1] if hit is not None and hit[0] == stored else AccountState.model_validate_json(
                readable(stored, f"the state of account {account!r}"))
        return state

    def _user(self, r: Result, key: str) -> UserState:
        u = r.users.get(key)
        if u is None:
            stored = self.users.get(key)
            u = r.users[key] = (UserState.model_validate_json(readable(stored, "a user's state (identity)")) if stored
                                else UserState(key=key))
        return u

    def keep(self, account: str, body: bytes, state: AccountState) -> None:
        """`state`, serialized as `body`, is now in the table: keep it parsed for the next envelope."""
        self.unkeep(account)
        if len(body) < self.cache_min:
            return
        self.parsed[account] = (body, state)
        self.parsed_bytes += len(body)
        while self.parsed_bytes > self.cache_bytes and len(self.parsed) > 1:
            self.parsed_bytes -= len(self.parsed.popitem(last=False)[1][0])

    def unkeep(self, account: str | None = None) -> tuple[bytes, AccountState] | None:
        """Take an account's parsed state out of the cache (all of them when None)."""
        if account is None:
            self.parsed.clear()
            self.parsed_bytes = 0
            return None
        hit = self.parsed.pop(account, None)
        if hit is not None:
            self.parsed_bytes -= len(hit[0])
        return hit

    def _clocks(self, r: Result, partition: int) -> sales.Clocks:
        if r.clocks is None:
            stored = self.clocks.get(str(partition))
            r.clocks = unversioned(json.loads(readable(stored, f"partition {partition}'s SLA clocks"))) if stored else {}
        return r.clocks

    def _waits(self, r: Result, partition: int) -> Waits:
        if r.waits is None:
            stored = self.clocks.get(f"w{partition}")
            hit = self.waits_parsed.get(partition)
            if stored and hit is not None and (hit[0] is stored or hit[0] == stored):
                r.waits = hit[1].copy()  # (behind a backlog it holds thousands of slots: parsed once)
            else:
                d = json.loads(readable(stored, f"partition {partition}'s waiting decisions")) if stored else {}
                r.waits = Waits(d.get("stream", 0), Waiting(d.get("accounts", {})),
                                {(e[2], e[3], e[4]): [e[0], e[1]] for e in d.get("links", ())})
                if stored:
                    self.waits_parsed[partition] = (stored, r.waits.copy())
            r.waits.stream = max(r.waits.stream, self.stream.get(partition, 0))
            r.waits_before = dict(r.waits.index.accounts)
        return r.waits

    def dump_waits(self, partition: int, w: Waits) -> bytes:
        """`w` as the table keeps it; kept parsed too, for the next envelope (`_waits`)."""
        body = w.dump()
        self.waits_parsed[partition] = (body, w.copy())
        return body

    def _emit(self, r: Result, topic: str, ev: CloudEvent) -> None:
        r.outputs.append((topic, ev.subject, ev.to_json().encode()))
        if ev.type == STAGE or ev.type == "pql.sla_breached":
            metrics.stage_transitions.labels(ev.data.stage, ev.data.lane).inc()

    async def process(self, body: bytes, partition: int, offset: int | None = None) -> Result:
        """Each account's events in the envelope are applied together (identity may release a burst
        of held ones), before any response or tick that follows them. `offset`: the envelope's, so
        every report whose fence it passes counts (barrier.py)."""
        r, pending = Result(), {}
        if offset is not None:
            self.heard.promote(partition, offset)
        for kind, key, raw in envelope.unpack(body):
            if kind in envelope.REPORTS:
                self.heard.inband(partition, kind, int(key), envelope.told_value(raw))
                r.barrier = None
                continue
            if kind in (envelope.RESPONSE, envelope.TICK):
                await self._flush(r, pending, partition)
                if kind == envelope.RESPONSE:
                    self._response(r, key, raw, partition)
                else:
                    await self._tick(r, int(raw), partition)
                continue
            try:
                arg = envelope.decode(kind, raw)
            except (InvalidEvent, ValueError):  # the ingest tier validated it; only a foreign producer gets here
                metrics.events_invalid.labels("invalid_field").inc()
                continue
            if kind == envelope.LINKED:
                self._linked(r, key, arg, partition)
                continue
            if kind in (envelope.EVENT, envelope.USER):
                r.raw[arg.messageId] = raw
            self._line(r, pending, kind, key, arg, partition)
        await self._flush(r, pending, partition)
        w = self._waits(r, partition)
        if w.links:
            await self._released(r, partition)
        w.stream = self.stream[partition] = max(w.stream, r.newest)  # stored with the index, when that changes
        if w.index.accounts:
            await self._release(r, partition, self._cut(r, partition))
        # (most wait only within the envelope)
        r.waits_changed = r.links_changed or w.index.accounts != r.waits_before
        r.reported = (w.stream, self._processed(partition))
        return r

    def _cut(self, r: Result, partition: int, idle: bool = False) -> int:
        """Decide what waits at or before this: `settle` behind the stream time (or everything on an
        idle tick), and never past the barrier."""
        cut = IDLE if idle else self._waits(r, partition).stream - self.settle
        if r.barrier is None:  # once per envelope, and again after a WATERMARK or INPUT line
            r.barrier = self._barrier(partition)
        return cut if r.barrier >= IDLE else min(cut, r.barrier + self.slack - self.settle)

    def _barrier(self, partition: int) -> int:
        """The lowest time this partition was told (an idle report: its tick), or NOTHING while it
        has not heard from every other partition and input partition."""
        heard = self.heard.view(partition)
        if self.inputs is not None:
            others = len(heard.told) - (partition in heard.told)
            if others < self.partitions - 1 or len(heard.inputs) < self.inputs:
                return NOTHING
        return min(heard.lowest_told(partition), heard.lowest_input)

    def _processed(self, partition: int) -> int:
        """How far every product.events partition has been routed to this partition, as far as it
        has read (NOTHING while one has not been heard from; IDLE without `inputs`, as in tests)."""
        heard = self.heard.view(partition)
        if self.inputs is not None and len(heard.inputs) < self.inputs:
            return NOTHING
        return heard.lowest_input

    def _answered(self, partition: int) -> int:
        """How far every sales.responses partition has been routed to this partition (NOTHING while
        one has not been heard from)."""
        heard = self.heard.view(partition)
        if self.answers is not None and len(heard.answers) < self.answers:
            return NOTHING
        return heard.lowest_answer

    def report(self, partition: int, now: int, idle: bool, committed: tuple[int, int] | None) -> int | None:
        """What this partition tells the others at a tick (streams/worker/progress.py): IDLE when it
        has processed and committed everything in its log, else its stream time as of its last
        commit (`committed`: (stream time, `_processed` then); None: nothing committed yet, no
        report). Never past how far the product.events partitions have been routed to it, as far as
        it has read: an event routed here but not processed yet (its worker was killed) can be
        older than the stream time, and would be forwarded to its account after that account
        decided on this report (chaos, session 9)."""
        if idle:
            told, processed = IDLE, self._processed(partition)
        elif committed is None:
            return None
        else:
            told, processed = committed
        if processed < (now if told >= IDLE else told):
            told = processed
        return told

    async def _release(self, r: Result, partition: int, cut: int | None) -> None:
        """Decide what waits at or before `cut` (all when None) on this partition."""
        w = self._waits(r, partition)
        for _, account in w.index.ready(cut):
            state = self._state(r, account)
            obs = Observation()
            qualified = self.engine.due(state, account, cut, obs)
            if not qualified and not obs.milestones:  # still expecting held events: nothing changes
                continue
            r.states[account] = state
            self._milestones(r, obs)
            await self._decide(r, account, state, qualified, partition)
            w.index.track(account, state)

    def _line(self, r: Result, pending: dict, kind: str, key: str, arg, partition: int) -> None:
        """Run one line, and the lines it leads to: those whose key is ours here, the others are
        forwarded to their partition (in this envelope's transaction)."""
        if kind in (identity.EVENT, identity.MARK) and envelope.partition_of(key, self.partitions) == partition:
            identity.collect(pending, kind, key, arg)  # an account's own line: no identity loop needed
            return

        def away(key: str) -> bool:
            return envelope.partition_of(key, self.partitions) != partition

        # a LINK line flagged by the ingest tier: its account learns where it is (a LINKED line)
        flagged = kind == identity.LINK and arg[2] is not None and len(arg[2]) > 2
        out: list = []
        held, dropped = self.identity.run_all([(kind, key, arg)], lambda k: self._user(r, k), pending, away,
                                              out.append if flagged else lambda line: self._forward(r, line))
        if flagged:
            self._link_forwards(r, arg, out)
        if held:
            metrics.events_held.inc(held)
        if dropped:
            metrics.events_unattributed.inc(dropped)

    def _forward(self, r: Result, line) -> None:
        r.forward.setdefault(envelope.partition_of(line[1], self.partitions), []).append(envelope.encode(*line))

    def _link_forwards(self, r: Result, arg, out: list) -> None:
        """What a flagged LINK line led to for other partitions. Its account learns the slot has
        released once this partition has committed past the line (`_released`), so a MARK that
        carries nothing (no event released, the common case) is left out: at 64 partitions such MARKs
        were most envelopes of a catch-up, one per group call (issue 25). Only if the account's
        partition's owner reads offsets: this worker, or one whose reports carry them (a worker of
        an older release waits for the MARK)."""
        account, _, call = arg
        home = envelope.partition_of(account, self.partitions)
        if len(out) == 1 and out[0][0] == identity.MARK and out[0][1] == account \
                and (home in self.owned or self.heard.logged.speaks_offsets(home)):
            metrics.marks_left_out.inc()
            return
        went_on = False
        for kind, key, a in out:
            if kind == identity.LINK and a[2] is not None:  # on to the key it joined: the MARK comes from there,
                a, went_on = (a[0], a[1], a[2][:2]), True  # unflagged (that partition is not the one named)
            self._forward(r, (kind, key, a))
        if went_on:
            self._forward(r, (envelope.LINKED, account, (call[0], call[1], -1, 0)))

    def _linked(self, r: Result, account: str, arg, partition: int) -> None:
        """A LINKED line: where a slot of a group call of `account` waits (envelope.py)."""
        call, slot, p, o = arg
        links, at = self._waits(r, partition).links, (account, call, slot)
        if p < 0:  # its LINK went on to another key: only its MARK answers (whatever order these came in)
            links[at] = [-1, 0]
        elif at not in links:
            links[at] = [p, o]
            r.links_added = True
            if len(links) > MAX_LINKS:
                del links[next(iter(links))]
        else:
            return
        r.links_changed = True

    async def _released(self, r: Result, partition: int) -> None:
        """The slots whose user key's partition has committed past their LINK line, as this partition
        counts its reports (barrier.py: by then it has read every line that partition forwarded
        before): they have released what they held, as a MARK would say."""
        w, heard = self._waits(r, partition), self.heard.view(partition)
        if heard is self.checked.get(partition) and not r.links_added:
            return  # (nothing new counted, nothing new waiting)
        self.checked[partition], r.links_added = heard, False
        done: dict[str, list] = {}
        for at, (p, o) in w.links.items():
            if p >= 0 and heard.committed(p) > o:
                done.setdefault(at[0], []).append(at[1:])
        if not done:
            return
        for account, slots in done.items():
            for call, slot in slots:
                del w.links[(account, call, slot)]
        r.links_changed = True
        busy = self.busy.get(partition)
        for account, slots in done.items():
            state = self._state(r, account)
            if state is None:
                continue
            marks = [(c, s, state.expect[c][0]) for c, s in slots if c in state.expect and s in state.expect[c][1]]
            if marks:
                await self._events(r, account, [], partition, marks)
        if busy is not None:
            self.busy[partition] = busy  # (no event came)

    async def _flush(self, r: Result, pending: dict, partition: int) -> None:
        for account, (events, marks) in pending.items():
            await self._events(r, account, events, partition, marks)
        pending.clear()

    async def _events(self, r: Result, account: str, events: list, partition: int, marks: list = ()) -> None:
        started = time.perf_counter()
        if marks and (links := self._waits(r, partition).links):  # a MARK answers its slot, whatever LINKED said
            for c, s, _ in marks:
                if links.pop((account, c, s), None) is not None:
                    r.links_changed = True
        # the stream time moves once the whole envelope is in (`process`)
        self.busy[partition] = True
        r.newest = max([r.newest, *(e.ms for e in events)])
        cut = self._cut(r, partition)
        state, obs = self.engine.observe_all(self._state(r, account), events, account, cut, marks)
        r.states[account] = state
        if obs.duplicates:
            metrics.events_duplicate.inc(obs.duplicates)
        for event in obs.too_late:
            metrics.events_late.inc()
            raw = r.raw.get(event.messageId) or event.model_dump_json(by_alias=True).encode()
            r.dead.append((account, raw, "too_late",
                           f"event time {event.timestamp.isoformat()} is more than the rules' lateness + hold "
                           f"behind account {account}'s newest event"))
        for reason in obs.diverged:
            metrics.divergence.labels(reason).inc()
        if obs.muted:
            metrics.suppressions_muted.inc(obs.muted)
        self._milestones(r, obs)
        await self._decide(r, account, state, obs.qualified, partition)
        self._waits(r, partition).index.track(account, state)
        if events:
            metrics.event_processing.observe((time.perf_counter() - started) / len(events))

    def _milestones(self, r: Result, obs: Observation) -> None:
        for m in obs.milestones:
            metrics.milestones_reached.labels(m.data.milestone).inc()
            self._emit(r, self.topics.signals, m)

    async def _decide(self, r: Result, account: str, state: AccountState, qualified: list[Pending],
                      partition: int) -> None:
        if qualified:
            record, took = await self.mql.get(account)
            metrics.mql_lookup.observe(took)
        for p in qualified:
            metrics.qualifications.inc()
            now = self.now_ms()
            state, decision, stages = self.engine.decide(state, p, record, now)
            if p.mutes:
                metrics.suppressions_muted.inc(p.mutes)
            if decision is None:
                if p.diverged:
                    metrics.divergence.labels(p.diverged).inc()
            elif decision.type == HANDOFF:
                self._emit(r, self.topics.handoffs, decision)
                metrics.handoffs_published.labels(decision.data.lane, decision.data.precedence).inc()
                metrics.event_to_handoff.observe(max(0.0, (now - p.ms) / 1000))
                if decision.data.backfill:  # a backlog: no SLA clock (and no alert)
                    metrics.handoffs_backfill.inc()
                else:
                    h = sales.last(state)
                    self._clocks(r, partition)[h.id] = [h.due, account]
                    r.clocks_changed = True
            else:
                self._emit(r, self.topics.signals, decision)
                metrics.handoffs_suppressed.labels(decision.data.reason).inc()
            for ev in stages:
                self._emit(r, self.topics.signals, ev)

    def _response(self, r: Result, account: str, raw: bytes, partition: int) -> None:
        try:
            resp = SalesResponse.model_validate_json(raw)
        except ValidationError:  # validated by the ingest tier; only a foreign producer gets here
            r.dead.append((account, raw, "bad_response", "not a valid sales response"))
            return
        state = self._state(r, account)
        events, outcome = sales.respond(state, resp) if state is not None else ([], "unknown_handoff")
        metrics.responses.labels(resp.status, outcome).inc()
        if outcome == "unknown_handoff":
            r.dead.append((account, raw, "unknown_handoff",
                           f"handoff_id {resp.handoff_id} is not among account {account}'s recent handoffs"))
            return
        r.states[account] = state
        if self._clocks(r, partition).pop(resp.handoff_id, None) is not None:  # any answer stops the clock
            r.clocks_changed = True
        for ev in events:
            self._emit(r, self.topics.signals, ev)
            if ev.data.stage == "sla_breached":  # the answer came after the SLA ran out (detectors/sales.py)
                metrics.sla_breaches.labels(ev.data.lane).inc()
            elif ev.data.stage == "accepted" and ev.data.seconds_since_handoff is not None:
                metrics.time_to_accept.labels(ev.data.lane).observe(max(0.0, ev.data.seconds_since_handoff))
            elif ev.data.stage == "rejected":
                metrics.rejections.labels(ev.data.reason or "none").inc()

    async def _tick(self, r: Result, now: int, partition: int) -> None:
        busy = self.busy.get(partition, True)
        if self._waits(r, partition).links:
            await self._released(r, partition)
        if not busy and self._waits(r, partition).index.accounts:  # no events for a tick: none earlier is coming soon
            await self._release(r, partition, self._cut(r, partition, idle=True))
        self.busy[partition] = False
        self._held(partition, now, max(self._waits(r, partition).stream, r.newest))
        stored = r.clocks if r.clocks is not None else self.clocks.get(str(partition))
        if not stored:
            return
        clocks = self._clocks(r, partition)
        now = min(now, self._answered(partition))  # an answer timed before the due time may be on its way
        for handoff_id, account in sales.due(clocks, now):
            del clocks[handoff_id]
            r.clocks_changed = True
            state = self._state(r, account)
            if state is None:
                continue
            events = sales.breach(state, handoff_id, now)
            r.states[account] = state
            for ev in events:
                metrics.sla_breaches.labels(ev.data.lane).inc()
                self._emit(r, self.topics.signals, ev)

    def _held(self, partition: int, now: int, stream: int) -> None:
        """pql_barrier_wait_seconds: how long the barrier has not moved while the partition's stream
        time is past it (decisions wait); past BARRIER_WARN, a warning (once a minute) naming who holds
        it: a partition or input that stopped reporting (its tick is old), reports an old time (it is
        behind), or has not been heard from (a restarted worker waits for every report)."""
        barrier = self._barrier(partition)
        moving = barrier >= IDLE or stream <= barrier + self.slack  # (nothing waits for it)
        waited = self.barrier_still.seconds(partition, barrier, now, moving=moving)
        metrics.barrier_wait.labels(str(partition)).set(waited / 1000)
        if waited < BARRIER_WARN or now - self.warned.get(partition, 0) < 60_000:
            return
        self.warned[partition] = now
        heard = self.heard.view(partition)
        if barrier == NOTHING:
            told, inputs = heard.told, heard.inputs
            who = ", ".join([f"partition {p}" for p in range(self.partitions) if p != partition and p not in told]
                            + [f"product.events partition {i}" for i in range(self.inputs or 0) if i not in inputs])
            if who:  # (else every source was heard, and one said "nothing yet": named below)
                log.warning("partition %d: decisions have waited %.0f s: not heard from %s yet", partition,
                            waited / 1000, who)
                return
        reports = [("partition", p, t) for p, t in heard.told.items() if p != partition]
        reports += [("product.events partition", p, t) for p, t in heard.inputs.items()]
        # the lowest report; on a tie an input's (a partition reports no further than the inputs it read)
        kind, p, (tick, at) = min(reports, key=lambda x: (x[2][0] if x[2][1] >= IDLE else x[2][1], x[0] == "partition"))
        said = "idle" if at >= IDLE else "nothing yet (it has not heard from every input)" if at < 0 else f"time {at}"
        log.warning("partition %d: decisions have waited %.0f s for %s %d, which last reported %s at its tick "
                    "%.0f s ago", partition, waited / 1000, kind, p, said, (now - tick) / 1000)


def refuse(err: NewerFormat) -> None:
    """Stop the worker: it met a value or envelope of a newer release (schemas/formats.py). Nothing is
    committed past it; the partition goes to a worker that reads it."""
    log.critical("%s; stopping", err)
    logging.shutdown()
    os._exit(EXIT_NEWER_FORMAT)


class Agent:
    """The `detect` agent's loop: one envelope at a time (concurrency 1: faust-streaming issue 606)."""

    def __init__(self, detector: Detect, publisher, tx: Transactions, dead: DeadLetters):
        self.detector, self.publisher, self.tx, self.dead = detector, publisher, tx, dead

    async def run(self, stream) -> None:
        acking = self.tx.start()
        async for ev in stream.noack().events():
            await self.envelope(ev, acking)

    async def envelope(self, ev, acking: set) -> None:
        m = ev.message
        try:
            check_headers(m.headers, f"envelope {m.offset} of {m.topic} partition {m.partition}")
            r = await self.detector.process(ev.value, m.partition, m.offset)  # phase 1: no sends; may wait for Redis
        except NewerFormat as err:
            refuse(err)
        for nth, (key, raw, reason, detail) in enumerate(r.dead):  # at-least-once, like every dead letter
            await self.dead.send(key.encode(), raw, m, reason, detail, nth)  # (a repeat has the same id)
        # Phase 2: outputs, state and the ack go into the partition's transaction as one unit; a
        # commit cannot slip in between (eos.guard_commits).
        async with self.tx.lock:
            if await self.publisher.publish(r, m.partition, m.offset):
                acking.add((m.tp, m.offset))  # the one ack eos.guard_skips lets through
                ev.ack()

