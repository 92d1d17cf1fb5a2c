"""`Detect` keeps parsed account states between envelopes; the table's bytes stay the truth.

No Kafka here: the table is a dict, and the MQL store answers "no record" (only qualification reads it).
"""
import asyncio
import json

from detectors.engine import Engine
from streams.worker import envelope
from streams.worker.detect import Detect
from streams.topics import Topics
from streams.config import Settings
from detectors.timefmt import parse_ms
from helpers import at, rules, track

RULES = rules({"invites": {"event": "Invite Sent", "count": 3, "within": "7d", "points": 60}})


class NoMql:
    async def get(self, account):
        return None, 0.0


def body(*docs) -> bytes:
    (b,) = envelope.pack_all([("acme", json.dumps(d).encode()) for d in docs])
    return b


def detect(table: dict) -> Detect:
    return Detect(Engine(RULES), Topics.of(Settings()), table, {}, NoMql(), cache_min=0)


def publish(d: Detect, table: dict, result) -> None:
    """What `detect` in streams/app.py does once an envelope is in its transaction."""
    for account, state in result.states.items():
        raw = state.model_dump_json().encode()
        table[account] = raw
        d.keep(account, raw, state)


def run(d: Detect, b: bytes):
    return asyncio.run(d.process(b, 0))


def test_an_envelope_not_published_leaves_nothing_behind():
    table: dict = {}
    d = detect(table)
    first = body(track("Invite Sent", at(hours=1)), track("Invite Sent", at(hours=2)))
    publish(d, table, run(d, first))
    second = body(track("Invite Sent", at(hours=3)))
    abandoned = run(d, second)  # e.g. the partition moved before its sends: not published
    again = run(d, second)      # its new owner (or we, later) process it from the table
    assert [o[2] for o in again.outputs] == [o[2] for o in abandoned.outputs]
    assert any(b'"pql.handoff"' in o[2] for o in again.outputs)  # not taken for a duplicate
    assert again.states["acme"].model_dump_json() == abandoned.states["acme"].model_dump_json()


def test_the_table_wins_over_a_kept_copy():
    table: dict = {}
    d = detect(table)
    publish(d, table, run(d, body(track("Invite Sent", at(hours=1)), track("Invite Sent", at(hours=2)))))
    fresh = detect({})
    publish(fresh, {}, run(fresh, body(track("Invite Sent", at(hours=1)))))
    table["acme"] = fresh.parsed["acme"][0]  # the table changed under us (e.g. recovered from the changelog)
    result = run(d, body(track("Invite Sent", at(hours=3))))
    assert not any(b'"pql.handoff"' in o[2] for o in result.outputs)  # 2 invites, not 3
    assert len(result.states["acme"].hits["invites"]) == 2


def test_kept_copies_are_bounded():
    table: dict = {}
    d = detect(table)
    for i in range(5):
        (b,) = envelope.pack_all([(f"a{i}", json.dumps(track("Invite Sent", at(hours=i), account=f"a{i}")).encode())])
        publish(d, table, run(d, b))
    assert list(d.parsed) == ["a0", "a1", "a2", "a3", "a4"]
    d.cache_bytes = len(table["a3"]) + len(table["a4"])  # room for two of these states
    d.keep("a4", table["a4"], d.parsed["a4"][1])
    assert list(d.parsed) == ["a3", "a4"] and d.parsed_bytes == sum(len(table[a]) for a in ("a3", "a4"))
    d.cache_min = 10**6  # states smaller than this are not kept
    (b,) = envelope.pack_all([("a0", json.dumps(track("Invite Sent", at(hours=9), account="a0")).encode())])
    publish(d, table, run(d, b))
    assert "a0" not in d.parsed and list(d.parsed) == ["a3", "a4"]
    d.unkeep()
    assert d.parsed == {} and d.parsed_bytes == 0


def test_identity_across_partitions_gives_what_replay_gives():
    """Four partitions, forwarding as the worker does: track calls without context.groupId, some
    before their user's group call, in any order, give replay's handoffs."""
    import io
    import random

    from helpers import group
    from streams.worker.ingest import Batch, Router
    from streams.tools.replay import replay

    r = rules({"invites": {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "7d",
                           "points": 60}})
    docs = []
    for a in range(12):
        user = f"user-{a}"
        docs += [track("Invite Sent", at(hours=a + k), account=None, user=user, email=f"{k}@x.io") for k in range(3)]
        docs.append(group(f"acct-{a}", at(hours=a + 1, minutes=30), user=user))
    lines = [json.dumps(d).encode() for d in docs]
    out = io.StringIO()
    replay(lines, Engine(r), {}, out, io.StringIO())
    want = sorted(out.getvalue().splitlines())
    assert len(want) == 12

    topics = Topics.of(Settings())
    for seed in range(5):
        shuffled = lines[:]
        random.Random(seed).shuffle(shuffled)
        parts = [Detect(Engine(r), topics, {}, {}, NoMql(), users={}, partitions=4) for _ in range(4)]
        tables = [({}, {}) for _ in range(4)]
        for p, d in enumerate(parts):
            d.accounts, d.users = tables[p]
        queue = []
        for raw in shuffled:  # one envelope per input event, as a slow ingest would send them
            batch = Batch()
            Router(Engine(r), topics, 4).route(raw, batch)
            queue += [(p, b) for (_, p), items in batch.envelopes.items() for b in envelope.pack_all(items)]
        got = []
        while queue:
            p, b = queue.pop(random.Random(seed).randrange(len(queue)))  # partitions interleave
            result = run_on(parts[p], b, p)
            got += [o[2].decode() for o in result.outputs if b'"pql.handoff"' in o[2] or b'"pql.suppressed"' in o[2]]
            for account, state in result.states.items():
                tables[p][0][account] = state.model_dump_json().encode()
            for key, u in result.users.items():
                tables[p][1][key] = u.model_dump_json().encode()
            queue += [(q, b2) for q, items in result.forward.items() for b2 in envelope.pack_all(items)]
        assert sorted(got) == want, seed


def run_on(d: Detect, b: bytes, partition: int):
    return asyncio.run(d.process(b, partition))


def test_settle_waits_for_the_stream_time_or_an_idle_tick():
    """Rules `settle`: the handoff waits, durably in the clocks table, until the partition's stream time
    passes it by `settle`; a late invite that comes meanwhile is in its evidence. An idle tick releases
    what still waits."""
    r = RULES.model_copy(update={"settle": 2 * 3_600_000})
    table, clocks = {}, {}
    d = Detect(Engine(r), Topics.of(Settings()), table, clocks, NoMql())

    def step(b: bytes) -> list[dict]:
        result = asyncio.run(d.process(b, 0))
        publish(d, table, result)
        if result.waits_changed:
            clocks["w0"] = result.waits.dump()
        return [json.loads(o[2]) for o in result.outputs if b'"pql.handoff"' in o[2]]

    def when(handoffs):
        return [parse_ms(h["data"]["qualified_at"]) for h in handoffs]

    assert step(body(track("Invite Sent", at(hours=1)), track("Invite Sent", at(hours=2)),
                     track("Invite Sent", at(hours=3)))) == []
    assert json.loads(clocks["w0"])["accounts"] == {"acme": parse_ms(at(hours=3))}
    # an earlier invite arrives late, within settle: the handoff, when made, is at the 3rd in time
    assert step(body(track("Invite Sent", at(minutes=30)))) == []
    assert json.loads(clocks["w0"])["accounts"] == {"acme": parse_ms(at(hours=2))}
    out = step(body(track("Invite Sent", at(hours=4, minutes=1))))  # stream time passes 2:00 + 2h
    assert when(out) == [parse_ms(at(hours=2))]
    assert len(out[0]["data"]["evidence"]["invites"]) == 3
    assert json.loads(clocks["w0"])["accounts"] == {"acme": parse_ms(at(hours=3))}  # then in cooldown
    # idle ticks: the first sees events since the last one, the next releases everything
    assert step(envelope.tick(1)) == []
    assert step(envelope.tick(2)) == []  # the 3:00 position decides a cooldown suppression
    assert json.loads(clocks["w0"])["accounts"] == {}


def _store(d: Detect, table: dict, clocks: dict, result) -> None:
    publish(d, table, result)
    if result.waits is not None:
        clocks["w0"] = result.waits.dump()


def _told(partition: int, tick: int, stream: int) -> bytes:
    (b,) = envelope.pack_all([envelope.told(envelope.WATERMARK, partition, tick, stream)])
    return b


def test_a_partition_decides_nothing_past_a_lagging_partition():
    """The barrier (streams/worker/detect.py): partition 1 last told it was at hour 1, so a
    qualification at hour 4 on partition 0 waits until partition 1 says it has passed it."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=2)
    _store(d, table, clocks, run(d, _told(1, 1, parse_ms(at(hours=1)))))
    held = run(d, body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]))
    _store(d, table, clocks, held)
    assert not any(b'"pql.handoff"' in o[2] for o in held.outputs)
    still = run(d, _told(1, 2, parse_ms(at(hours=3))))  # not yet past hour 4
    _store(d, table, clocks, still)
    assert not any(b'"pql.handoff"' in o[2] for o in still.outputs)
    released = run(d, _told(1, 3, parse_ms(at(hours=5))))
    assert [json.loads(o[2])["type"] for o in released.outputs if b'"pql.handoff"' in o[2]] == ["pql.handoff"]


def test_without_a_lagging_partition_nothing_waits():
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=2)
    _store(d, table, clocks, run(d, _told(1, 1, parse_ms(at(hours=1)))))
    _store(d, table, clocks, run(d, _told(1, parse_ms(at(hours=5)), envelope.IDLE)))  # idle at hour 5
    now = run(d, body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]))
    assert any(b'"pql.handoff"' in o[2] for o in now.outputs)


def test_a_partition_reports_its_committed_stream_time_or_idle():
    """What a partition tells the others at a tick (streams/worker/progress.py): its stream time as
    of its last commit, or IDLE (counts as the tick) once it has read and committed its whole log."""
    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=3)
    me = envelope.partition_of("acme", 3)
    first = asyncio.run(d.process(body(track("Invite Sent", at(hours=2))), me))
    assert first.reported == (parse_ms(at(hours=2)), envelope.IDLE)
    assert d.report(me, 1000, idle=False, committed=first.reported) == parse_ms(at(hours=2))
    assert d.report(me, 1000, idle=False, committed=None) is None  # nothing committed yet: no report
    assert d.report(me, 2000, idle=True, committed=first.reported) == envelope.IDLE


def test_a_lagging_input_partition_holds_decisions_too():
    """The ingest tier says how far it has routed each product.events partition: a partition whose
    consumer died with its worker (user events on it not routed yet) holds every account's decisions."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=1)

    def routed(tick: int, ms: int) -> bytes:
        (b,) = envelope.pack_all([envelope.told(envelope.INPUT, 3, tick, ms)])
        return b

    _store(d, table, clocks, run(d, routed(1, parse_ms(at(hours=1)))))
    held = run(d, body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]))
    _store(d, table, clocks, held)
    assert not any(b'"pql.handoff"' in o[2] for o in held.outputs)
    released = run(d, routed(parse_ms(at(hours=5)), envelope.IDLE))  # caught up at hour 5: nothing held or unread
    assert any(b'"pql.handoff"' in o[2] for o in released.outputs)


def _routed(tick: int, ms: int, partition: int = 3) -> bytes:
    (b,) = envelope.pack_all([envelope.told(envelope.INPUT, partition, tick, ms)])
    return b


def _tick(ms: int) -> bytes:
    (b,) = envelope.pack_all([(envelope.marked(envelope.TICK, ""), str(ms).encode())])
    return b


def test_an_idle_report_counts_as_its_tick():
    """Idle at a tick says nothing about what comes after it: a partition idle at hour 1 (whose
    worker may die the next moment) holds a decision at hour 4 until it reports again."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=1)
    _store(d, table, clocks, run(d, _routed(parse_ms(at(hours=1)), envelope.IDLE)))
    held = run(d, body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]))
    _store(d, table, clocks, held)
    assert not any(b'"pql.handoff"' in o[2] for o in held.outputs)
    released = run(d, _routed(parse_ms(at(hours=5)), envelope.IDLE))
    assert any(b'"pql.handoff"' in o[2] for o in released.outputs)


def test_what_one_partition_was_told_does_not_free_another():
    """Reports are read per partition: one read on another partition can be ahead of lines this
    partition has not read yet."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=2)
    me = envelope.partition_of("acme", 2)
    _store(d, table, clocks, asyncio.run(d.process(_routed(parse_ms(at(hours=1)), parse_ms(at(hours=1))), me)))
    _store(d, table, clocks, asyncio.run(d.process(_routed(parse_ms(at(hours=5)), envelope.IDLE), 1 - me)))
    held = asyncio.run(d.process(body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]), me))
    assert not any(b'"pql.handoff"' in o[2] for o in held.outputs)


def test_a_partition_decides_nothing_until_it_has_heard_from_every_input_partition():
    """A restarted worker knows nothing of the others: it waits for a report from each of the
    product.events partitions (and each other accounts partition) before deciding."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=1, inputs=2)
    held = run(d, body(*[track("Invite Sent", at(hours=h)) for h in (2, 3, 4)]))
    _store(d, table, clocks, held)
    assert not any(b'"pql.handoff"' in o[2] for o in held.outputs)
    half = run(d, _routed(parse_ms(at(hours=5)), envelope.IDLE, partition=0))
    _store(d, table, clocks, half)
    assert not any(b'"pql.handoff"' in o[2] for o in half.outputs)
    released = run(d, _routed(parse_ms(at(hours=5)), envelope.IDLE, partition=1))
    assert any(b'"pql.handoff"' in o[2] for o in released.outputs)


def test_a_clock_breaches_only_once_every_answer_before_its_due_time_is_in():
    """An answer timed before the due time may still be on its way (its sales.responses partition
    behind): the tick past the due time waits for the ANSWERS reports to pass it."""
    table, clocks = {}, {}
    d = Detect(Engine(RULES), Topics.of(Settings()), table, clocks, NoMql(), partitions=1, answers=1)

    def answered(tick: int, ms: int) -> bytes:
        return next(envelope.pack_all([envelope.told(envelope.ANSWERS, 0, tick, ms)]))

    def step(b: bytes) -> list[str]:
        result = run(d, b)
        _store(d, table, clocks, result)
        if result.clocks_changed:
            clocks["0"] = json.dumps(result.clocks).encode()
        return [json.loads(o[2])["type"] for o in result.outputs]

    assert "pql.handoff" in step(body(*[track("Invite Sent", at(hours=h)) for h in (1, 2, 3)]))
    (due, _), = json.loads(clocks["0"]).values()
    assert "pql.sla_breached" not in step(envelope.tick(due + 1))  # not heard from sales.responses yet
    assert "pql.sla_breached" not in step(answered(due + 2, due - 1000) + b"\n" + envelope.tick(due + 2))
    assert "pql.sla_breached" in step(answered(due + 3, envelope.IDLE) + b"\n" + envelope.tick(due + 3))


def test_a_partition_reports_no_further_than_the_input_it_has_read():
    """Its stream time is not a promise about events routed to it but not read yet (chaos seed 2,
    session 9: a user's event sat unread when its worker was killed, the account decided on the
    report, and the event was forwarded after). The report is bounded by the INPUT reports read."""
    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=2, inputs=1)
    me = envelope.partition_of("acme", 2)
    asyncio.run(d.process(_routed(parse_ms(at(hours=1)), parse_ms(at(hours=1)), partition=0), me))
    busy = asyncio.run(d.process(body(track("Feature Used", at(hours=3))), me))
    assert d.report(me, parse_ms(at(hours=3)), idle=False, committed=busy.reported) == parse_ms(at(hours=1))
    asyncio.run(d.process(_routed(parse_ms(at(hours=4)), envelope.IDLE, partition=0), me))
    assert d.report(me, parse_ms(at(hours=4)), idle=True, committed=busy.reported) == envelope.IDLE
    assert d.report(me, parse_ms(at(hours=4)), idle=False, committed=busy.reported) == parse_ms(at(hours=1))


def test_a_restarted_partition_reports_nothing_until_it_has_read_every_input_report():
    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=2, inputs=2)
    me = envelope.partition_of("acme", 2)
    asyncio.run(d.process(_routed(parse_ms(at(hours=2)), envelope.IDLE, partition=0), me))
    assert d.report(me, parse_ms(at(hours=3)), idle=True, committed=None) == -envelope.IDLE


def test_a_barrier_held_far_behind_names_who_holds_it(caplog):
    """A reporter that stopped (cluster chaos, session 11: every decision after one moment waited
    for minutes) is named, with the wait in pql_barrier_wait_seconds."""
    from streams.worker import metrics

    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=2, inputs=2)
    me = envelope.partition_of("acme", 2)

    h = lambda n: parse_ms(at(hours=n))  # noqa: E731
    asyncio.run(d.process(_routed(h(1), envelope.IDLE, partition=0) + b"\n" + _routed(h(1), h(1), partition=1)
                          + b"\n" + _told(1 - me, h(1), envelope.IDLE), me))
    asyncio.run(d.process(body(track("Feature Used", at(hours=1))) + b"\n" + _tick(h(1)), me))
    assert not [r for r in caplog.records if "decisions have waited" in r.message]
    # input partition 1 says nothing more while the rest goes on for two hours
    for n in (2, 3):
        asyncio.run(d.process(_routed(h(n), envelope.IDLE, partition=0) + b"\n" + _told(1 - me, h(n), envelope.IDLE)
                              + b"\n" + body(track("Feature Used", at(hours=n))) + b"\n" + _tick(h(n)), me))
    first, second = [r.message for r in caplog.records if "decisions have waited" in r.message]  # (once a minute)
    assert first == (f"partition {me}: decisions have waited 3600 s for product.events partition 1, "
                     f"which last reported time {h(1)} at its tick 3600 s ago")
    assert "waited 7200 s" in second and "tick 7200 s ago" in second
    assert metrics.REGISTRY.get_sample_value("pql_barrier_wait_seconds", {"partition": str(me)}) == 7200
    # it reports again: the barrier moves, nothing waits
    asyncio.run(d.process(_routed(h(4), envelope.IDLE, partition=1) + b"\n" + _routed(h(4), envelope.IDLE, partition=0)
                          + b"\n" + _told(1 - me, h(4), envelope.IDLE) + b"\n" + _tick(h(4)), me))
    assert metrics.REGISTRY.get_sample_value("pql_barrier_wait_seconds", {"partition": str(me)}) == 0


def test_a_partition_that_says_nothing_yet_is_named(caplog):
    """Every source heard, but one partition reports "nothing yet" (it has not heard from every
    input itself): the warning names it (it used to say "not heard from  yet", naming no one)."""
    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=2, inputs=2)
    me = envelope.partition_of("acme", 2)

    for n in (1, 2, 3):
        h = parse_ms(at(hours=n))
        asyncio.run(d.process(_routed(h, envelope.IDLE, partition=0) + b"\n" + _routed(h, envelope.IDLE, partition=1)
                              + b"\n" + _told(1 - me, h, -envelope.IDLE) + b"\n" + body(track("Feature Used", at(hours=n)))
                              + b"\n" + _tick(h), me))
    said = [r.message for r in caplog.records if "decisions have waited" in r.message]
    assert said and said[0].startswith(f"partition {me}: decisions have waited 3600 s for partition {1 - me}, which "
                                       "last reported nothing yet (it has not heard from every input)")


def test_a_restarted_partition_that_never_hears_from_an_input_names_it(caplog):
    d = Detect(Engine(RULES), Topics.of(Settings()), {}, {}, NoMql(), partitions=2, inputs=2)
    me = envelope.partition_of("acme", 2)

    for n in (1, 2, 3):  # input partition 1 never reports
        asyncio.run(d.process(_routed(parse_ms(at(hours=n)), envelope.IDLE, partition=0) + b"\n"
                              + body(track("Feature Used", at(hours=n))) + b"\n" + _tick(parse_ms(at(hours=n))), me))
    said = [r.message for r in caplog.records if "decisions have waited" in r.message]
    assert said and said[0] == (f"partition {me}: decisions have waited 3600 s: not heard from partition {1 - me}, "
                                "product.events partition 1 yet")
