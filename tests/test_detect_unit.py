"""`Detect` keeps parsed account states between envelopes; the table's bytes stay the truth.

No Kafka here: the table is a dict, and the MQL store answers "no record" (only qualification reads it).
"""
import asyncio
import json

from detectors.engine import Engine
from streams import envelope
from streams.detect import Detect
from streams.topics import Topics
from streams.config import Settings
from helpers import at, rules, track

RULES = rules({"invites": {"event": "Invite Sent", "count": 3, "within": "7d", "points": 60}})


class NoMql:
    async def get(self, account):
        return None, 0.0


def body(*docs) -> bytes:
    (b,) = envelope.pack_all([("acme", json.dumps(d).encode()) for d in docs])
    return b


def detect(table: dict) -> Detect:
    return Detect(Engine(RULES), Topics.of(Settings()), table, {}, NoMql())


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
    assert len(result.states["acme"].seen) == 2


def test_kept_copies_are_bounded():
    table: dict = {}
    d = detect(table)
    d.cache_size = 3
    for i in range(5):
        (b,) = envelope.pack_all([(f"a{i}", json.dumps(track("Invite Sent", at(hours=i), account=f"a{i}")).encode())])
        publish(d, table, run(d, b))
    assert list(d.parsed) == ["a2", "a3", "a4"]
