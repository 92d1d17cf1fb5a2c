"""A group call's user keys answer its account without a line per call (issue 25).

The ingest tier flags each LINK line bound for another partition than its account's and, once it is
acked, tells the account where it is (a LINKED line: partition, offset). The user key's partition
leaves out a MARK that would carry nothing; the account counts the slot released once that
partition reports it has committed past the line. No Kafka here: each partition's log is a list, a
commit follows each envelope, and its offset report goes into every other log after the envelope's
forwards (as the barrier's fence orders them live: streams/worker/barrier.py).
"""
import asyncio
import io
import json
import random

from detectors.engine import Engine
from helpers import at, group, rules, track
from streams.config import Settings
from streams.tools.replay import replay
from streams.topics import Topics
from streams.worker import envelope, metrics
from streams.worker.barrier import EMPTY
from streams.worker.detect import Detect
from streams.worker.route import Batch, Router

TOPICS = Topics.of(Settings())
RULES = rules({"invites": {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "7d",
                           "points": 60}})


class NoMql:
    async def get(self, account):
        return None, 0.0


def speaking(d: Detect, partitions: int) -> Detect:
    """As if every partition's owner had reported its offsets (this release)."""
    d.heard.logged = EMPTY.merged([(envelope.WATERMARK, p, (1, 0)) for p in range(partitions)]
                                  + [(envelope.OFFSET, p, (1, 0)) for p in range(partitions)])
    return d


def anonymous(doc: dict, anon: str) -> dict:
    doc = dict(doc)
    doc.pop("userId", None)
    doc["anonymousId"] = anon
    return doc


def identify(user: str, anon: str, ts: str, mid: str) -> dict:
    return {"type": "identify", "userId": user, "anonymousId": anon, "timestamp": ts, "messageId": mid, "traits": {}}


def history(early: bool = False) -> list[bytes]:
    """Users whose invites come before their group call (held, then released), users whose group
    call comes first (nothing held: the MARK carries nothing), and anonymous visitors joined to
    their user before a group call that names both ids (the anonymous key's LINK goes on to the user's)."""
    docs = []
    for a in range(10):
        user = f"user-{a}"
        if a % 3 == 0:
            docs.append(group(f"acct-{a}", at(hours=a), user=user))
            docs += [track("Invite Sent", at(hours=a + k + 1), account=None, user=user, email=f"{k}@x.io")
                     for k in range(3)]
        elif a % 3 == 1:
            docs += [track("Invite Sent", at(hours=a + k), account=None, user=user, email=f"{k}@x.io") for k in range(3)]
            docs.append(group(f"acct-{a}", at(hours=a + 1, minutes=30), user=user))
        elif early and a % 3 == 2:  # its own invites qualify it; one held before its group call makes it earlier
            docs += [track("Invite Sent", at(hours=a + k), account=f"acct-{a}", user=user, email=f"{k}@x.io")
                     for k in (2, 3, 4)]
            docs.append(track("Invite Sent", at(hours=a), account=None, user=user, email="0@x.io"))
            docs.append(group(f"acct-{a}", at(hours=a, minutes=30), user=user))
        else:
            anon = f"anon-{a}"
            docs.append(anonymous(track("Invite Sent", at(hours=a), account=None, user=user, email="0@x.io"), anon))
            docs.append(identify(user, anon, at(hours=a, minutes=10), f"i{a}"))
            docs += [track("Invite Sent", at(hours=a + k), account=None, user=user, email=f"{k}@x.io") for k in (1, 2)]
            call = group(f"acct-{a}", at(hours=a + 2, minutes=30), user=user)
            call["anonymousId"] = anon
            docs.append(call)
    return [json.dumps(d).encode() for d in docs]


def live(lines: list[bytes], seed: int, partitions: int = 4, offsets: bool = True, shuffle: bool = True
         ) -> tuple[list[str], int]:
    """The worker's protocol over in-memory logs, partitions and the ingest tier interleaved at
    random (the input in random order, or in the order given). Returns (handoffs and suppressions,
    envelopes forwarded between partitions)."""
    rng = random.Random(seed)
    parts = [Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=partitions)
             for _ in range(partitions)]
    tables = [({}, {}) for _ in range(partitions)]
    for p, d in enumerate(parts):
        d.accounts, d.users = tables[p]
        if offsets:
            speaking(d, partitions)
    logs: list[list[bytes]] = [[] for _ in range(partitions)]
    done = [0] * partitions
    inputs = lines[::-1]  # (popped from the end)
    if shuffle:
        rng.shuffle(inputs)
    got, forwarded = [], 0
    while inputs or any(done[p] < len(logs[p]) for p in range(partitions)):
        ready = [p for p in range(partitions) if done[p] < len(logs[p])]
        if inputs and (not ready or rng.random() < 0.4):  # the ingest tier routes one event
            batch = Batch()
            Router(Engine(RULES), TOPICS, partitions).route(inputs.pop(), batch)
            for (_, p), items in batch.envelopes.items():
                logs[p] += envelope.pack_all(items)
            if offsets:  # then, its envelopes acked, where each flagged LINK line is
                by_home: dict = {}
                for home, account, call, slot, q in batch.links:
                    by_home.setdefault(home, []).append(
                        envelope.encode(envelope.LINKED, account, (call, slot, q, len(logs[q]) - 1)))
                for home, items in by_home.items():
                    logs[home] += envelope.pack_all(items)
            continue
        p = rng.choice(ready)
        b = logs[p][done[p]]
        result = asyncio.run(parts[p].process(b, p, done[p]))
        done[p] += 1
        got += [o[2].decode() for o in result.outputs if b'"pql.handoff"' in o[2] or b'"pql.suppressed"' in o[2]]
        for account, state in result.states.items():
            tables[p][0][account] = state.model_dump_json().encode()
        for key, u in result.users.items():
            tables[p][1][key] = u.model_dump_json().encode()
        for q, items in result.forward.items():
            forwarded += 1
            logs[q] += envelope.pack_all(items)
        if result.waits is not None and result.waits_changed:
            parts[p].clocks[f"w{p}"] = result.waits.dump()
        if offsets and not b.startswith(b"\x1ec"):  # committed: its report reaches the others after its forwards
            (report,) = envelope.pack_all([envelope.told(envelope.OFFSET, p, 1, done[p])])
            for q in range(partitions):
                if q != p:
                    logs[q].append(report)
    return sorted(got), forwarded


def test_the_links_protocol_gives_what_replay_gives_with_fewer_forwards():
    lines = history()
    out = io.StringIO()
    replay(lines, Engine(RULES), {}, out, io.StringIO())
    want = sorted(out.getvalue().splitlines())
    assert len(want) == 10
    before = metrics.marks_left_out._value.get()
    for seed in range(8):
        got, _ = live(lines, seed)
        assert got == want, seed
        old, _ = live(lines, seed, offsets=False)  # owners of an older release: a MARK per slot
        assert old == want, seed
    assert metrics.marks_left_out._value.get() > before


def test_a_slot_answered_by_a_report_never_comes_before_what_its_user_key_released():
    """Input in time order, partitions at random: an account whose own events qualify it, and whose
    user's held event (released by the group call) makes it qualify earlier, waits for that event
    (the sorted stream's handoff), however the partitions interleave."""
    lines = sorted(history(early=True), key=lambda raw: json.loads(raw)["timestamp"])
    out = io.StringIO()
    replay(lines, Engine(RULES), {}, out, io.StringIO())
    want = sorted(out.getvalue().splitlines())
    for seed in range(12):
        got, _ = live(lines, seed, shuffle=False)
        assert got == want, seed


def test_group_calls_whose_users_held_nothing_forward_nothing():
    """The common case (and a catch-up's: issue 25): users whose events name their account."""
    docs = []
    for a in range(20):
        docs.append(group(f"acct-{a}", at(hours=a), user=f"user-{a}"))
        docs += [track("Invite Sent", at(hours=a, minutes=k + 1), account=f"acct-{a}", user=f"user-{a}",
                       email=f"{k}@x.io") for k in range(3)]
    lines = [json.dumps(d).encode() for d in docs]
    out = io.StringIO()
    replay(lines, Engine(RULES), {}, out, io.StringIO())
    want = sorted(out.getvalue().splitlines())
    assert len(want) == 20
    got, forwarded = live(lines, 1)
    old, forwarded_old = live(lines, 1, offsets=False)
    assert got == old == want
    assert forwarded == 0 and forwarded_old >= 10  # (a few users' keys share their account's partition)


def _lines(*items) -> bytes:
    (b,) = envelope.pack_all(list(items))
    return b


def test_a_slot_waits_until_its_partition_has_committed_past_its_link_line():
    d = speaking(Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=4), 4)
    account, call = "acme", group("acme", at(hours=1), user="u9", mid="g-1")
    q = envelope.partition_of("u:u9", 4)
    home = envelope.partition_of(account, 4)
    assert q != home
    invites = [track("Invite Sent", at(hours=2, minutes=k), account=account, user="u9", email=f"{k}@x.io")
               for k in range(3)]
    first = asyncio.run(d.process(_lines(*[(account, json.dumps(x).encode()) for x in [call] + invites]), home, 0))
    assert not [o for o in first.outputs if b'"pql.handoff"' in o[2]]  # the slot has not answered
    d.accounts[account] = first.states[account].model_dump_json().encode()
    d.clocks[f"w{home}"] = first.waits.dump()
    linked = _lines(envelope.encode(envelope.LINKED, account, ("g-1", "u", q, 7)))
    r = asyncio.run(d.process(linked, home, 1))
    assert json.loads(r.waits.dump())["links"] == [[q, 7, account, "g-1", "u"]]
    d.clocks[f"w{home}"] = r.waits.dump()
    not_yet = asyncio.run(d.process(_lines(envelope.told(envelope.OFFSET, q, 1, 7)), home, 2))
    assert not [o for o in not_yet.outputs if b'"pql.handoff"' in o[2]]  # offset 7 itself not committed yet
    past = asyncio.run(d.process(_lines(envelope.told(envelope.OFFSET, q, 2, 8)), home, 3))
    assert [o for o in past.outputs if b'"pql.handoff"' in o[2]]
    assert b'"links"' not in past.waits.dump()


def test_a_link_that_went_on_to_another_key_waits_for_its_mark():
    """The anonymous key's LINK goes on to the user it joined: that partition sends the MARK, and a
    report of the anonymous key's partition must not answer the slot, whatever order they come in."""
    d = speaking(Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=4), 4)
    account = "acme"
    call = group(account, at(hours=1), user="u9", mid="g-2")
    call["anonymousId"] = "v9"
    qa, qu = envelope.partition_of("a:v9", 4), envelope.partition_of("u:u9", 4)
    home = envelope.partition_of(account, 4)
    invites = [track("Invite Sent", at(hours=2, minutes=k), account=account, user="u9", email=f"{k}@x.io")
               for k in range(3)]
    r = asyncio.run(d.process(_lines(*[(account, json.dumps(x).encode()) for x in [call] + invites]), home, 0))
    d.accounts[account] = r.states[account].model_dump_json().encode()
    steps = [_lines(envelope.encode(envelope.LINKED, account, ("g-2", "a", -1, 0))),  # from the anonymous key's partition
             _lines(envelope.encode(envelope.LINKED, account, ("g-2", "a", qa, 3))),  # from the ingest tier, later
             _lines(envelope.encode(envelope.LINKED, account, ("g-2", "u", qu, 5))),
             _lines(envelope.told(envelope.OFFSET, qa, 1, 10), envelope.told(envelope.OFFSET, qu, 1, 10))]
    for n, b in enumerate(steps, 1):
        d.clocks[f"w{home}"] = r.waits.dump() if r.waits is not None else d.clocks.get(f"w{home}")
        r = asyncio.run(d.process(b, home, n))
        if r.states.get(account) is not None:
            d.accounts[account] = r.states[account].model_dump_json().encode()
        assert not [o for o in r.outputs if b'"pql.handoff"' in o[2]], n
    d.clocks[f"w{home}"] = r.waits.dump()
    mark = _lines(envelope.encode("m", account, ("g-2", "a", parse_ms(at(hours=1)))))
    r = asyncio.run(d.process(mark, home, 9))
    assert [o for o in r.outputs if b'"pql.handoff"' in o[2]]
    assert b'"links"' not in r.waits.dump()


def parse_ms(ts: str) -> int:
    from detectors.timefmt import parse_ms as p
    return p(ts)


def test_the_users_partition_leaves_out_a_mark_that_carries_nothing_only_for_an_owner_that_reads_offsets():
    account = "acme"
    home, q = envelope.partition_of(account, 4), envelope.partition_of("u:u9", 4)
    link = _lines(envelope.encode("l", "u:u9", (account, parse_ms(at(hours=1)), ["g-3", "u", 1])))
    new = speaking(Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=4), 4)
    assert asyncio.run(new.process(link, q, 0)).forward == {}
    old = Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=4)  # no offsets heard from `home`
    assert list(asyncio.run(old.process(link, q, 0)).forward) == [home]
    # with a held event, the MARK goes with it
    held = Detect(Engine(RULES), TOPICS, {}, {}, NoMql(), users={}, partitions=4)
    speaking(held, 4)
    invite = track("Invite Sent", at(minutes=50), account=None, user="u9", email="a@x.io")
    r = asyncio.run(held.process(_lines(("\x1eu" + "u:u9", json.dumps(invite).encode())), q, 0))
    held.users = {k: u.model_dump_json().encode() for k, u in r.users.items()}
    r = asyncio.run(held.process(link, q, 1))
    kinds = [k for k, _, _ in envelope.unpack(b"\n".join(envelope.pack_all(r.forward[home])))]
    assert kinds == ["e", "m"]


def test_the_router_flags_a_link_bound_for_another_partition_than_its_account():
    batch = Batch()
    call = group("acme", at(hours=1), user="u9", mid="g-4")
    call["anonymousId"] = "v9"
    Router(Engine(RULES), TOPICS, 4).route(json.dumps(call).encode(), batch)
    home = envelope.partition_of("acme", 4)
    want = [(home, "acme", "g-4", slot, envelope.partition_of(k, 4)) for slot, k in (("u", "u:u9"), ("a", "a:v9"))
            if envelope.partition_of(k, 4) != home]
    assert batch.links == want and want
    for (_, p), items in batch.envelopes.items():
        for kind, key, raw in envelope.unpack(b"\n".join(envelope.pack_all(items))):
            if kind == "l":
                assert (json.loads(raw)[2][2:] == [1]) == (p != home)
