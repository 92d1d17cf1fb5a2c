"""Input as real payloads carry it (issue 23): numbers as strings, calls without `timestamp`, and
device clocks far ahead. Replay and the live router read them the same way."""
import io
import json
from pathlib import Path

import pytest

from detectors import identity
from detectors.clock import check_future
from detectors.engine import Engine
from detectors.timefmt import parse_ms
from helpers import at, group, kinds, rules, run, track
from schemas.events import InvalidEvent, parse_event
from schemas.rules import load_rules
from streams.config import Settings
from streams.tools.replay import Replay
from streams.topics import Topics
from streams.worker import envelope
from streams.worker.route import Batch, Router

EXAMPLE = load_rules(Path(__file__).resolve().parents[2] / "examples/rules.yaml")
INVITES = {"inv": {"event": "Invite Sent", "distinct": "properties.email", "count": 3, "within": "7d", "points": 60}}
HOUR = 3_600_000


def _invites(days=0, **extra) -> list[dict]:
    return [{**track("Invite Sent", at(days=days, hours=k), email=f"p{k}@x.io"), **extra} for k in range(3)]


# -- values: numeric strings ----------------------------------------------------------------------
@pytest.mark.parametrize("employees,handed_off", [("4500", True), (4500, True), ("9", False), ("51-200", False)])
def test_employees_as_a_string_passes_fit_as_a_number(employees, handed_off):
    """The Segment spec types group `employees` as a String; the example rules say `gte: 10`."""
    out, _, _ = run(EXAMPLE, [group("acme", at(), employees=employees),
                              *[track("Invite Sent", at(hours=k + 1), invitee_email=f"p{k}@x.io") for k in range(3)]])
    assert kinds(out) == (["pql.handoff"] if handed_off else ["pql.suppressed"])
    if not handed_off:
        assert out[0]["data"]["reason"] == "not_fit"


# -- timestamps as SDKs write them -----------------------------------------------------------------
def _doc(**times) -> bytes:
    return json.dumps({"type": "track", "event": "Invite Sent", "messageId": "m1", "userId": "u", **times}).encode()


def test_a_call_without_timestamp_gets_segments():
    e = parse_event(_doc(originalTimestamp="2026-11-01T10:00:00Z", sentAt="2026-11-01T10:05:00Z",
                         receivedAt="2026-11-01T09:06:00.250Z"))  # device clock 59 min 59.75 s fast
    assert e.ms == parse_ms("2026-11-01T09:01:00.250Z")  # receivedAt - (sentAt - originalTimestamp)
    assert parse_event(_doc(originalTimestamp="2026-11-01T10:00:00Z", sentAt="2026-11-01T10:05:00Z")).ms == \
        parse_ms("2026-11-01T10:00:00Z")
    assert parse_event(_doc(originalTimestamp="2026-11-01T10:00:00", receivedAt="2026-11-02T00:00:00Z")).ms == \
        parse_ms("2026-11-01T10:00:00Z")  # no sentAt: originalTimestamp (no zone: UTC)
    assert parse_event(_doc(receivedAt="2026-11-02T00:00:00Z", sentAt="2026-11-01T00:00:00Z")).ms == \
        parse_ms("2026-11-02T00:00:00Z")
    # a timestamp the call has is kept
    assert parse_event(_doc(timestamp="2026-11-03T00:00:00Z", originalTimestamp="2026-11-01T10:00:00Z",
                            receivedAt="2026-11-02T00:00:00Z")).ms == parse_ms("2026-11-03T00:00:00Z")


@pytest.mark.parametrize("times,reason,named", [
    ({}, "missing_field", "timestamp"),
    ({"sentAt": "2026-11-01T10:05:00Z"}, "missing_field", "timestamp"),
    ({"originalTimestamp": "yesterday"}, "bad_timestamp", "originalTimestamp"),
    ({"receivedAt": "2026-13-01T00:00:00Z"}, "bad_timestamp", "receivedAt"),
    ({"sentAt": "3026-11-01T10:05:00Z", "originalTimestamp": "2026-11-01T10:00:00Z"}, "bad_timestamp", "sentAt"),
    ({"originalTimestamp": "1971-01-01T00:00:00Z", "sentAt": "2199-11-01T10:05:00Z",
      "receivedAt": "2026-11-01T10:00:00Z"}, "bad_timestamp", "sentAt - originalTimestamp"),
])
def test_calls_whose_times_cannot_be_used_are_refused_naming_the_field(times, reason, named):
    with pytest.raises(InvalidEvent) as bad:
        parse_event(_doc(**times))
    assert bad.value.reason == reason and named in bad.value.detail


def test_replay_counts_calls_without_timestamp_like_the_others():
    docs = _invites()
    for d in docs:
        d["originalTimestamp"] = d.pop("timestamp")
    out, summary, _ = run(rules(INVITES), docs)
    assert kinds(out) == ["pql.handoff"] and not summary.invalid


# -- wrong clocks ----------------------------------------------------------------------------------
def _ahead(doc: dict, received: str, sent_ahead: bool) -> dict:
    """`doc` sent from a device whose clock is a year ahead, received at `received`."""
    year = 365 * 24 * HOUR
    from detectors.timefmt import iso

    ahead = iso(parse_ms(doc["timestamp"]) + year)
    out = {**doc, "timestamp": ahead, "receivedAt": received}
    if sent_ahead:
        out["sentAt"] = iso(parse_ms(received) + year)  # sent on receipt, by the wrong clock
    return out


def test_an_event_a_year_ahead_does_not_poison_its_account():
    real = _invites()
    wrong = _ahead(track("Invite Sent", at(days=2), email="p9@x.io"), at(days=2), sent_ahead=False)
    out, summary, err = run(rules(INVITES), [*real[:1], wrong, *real[1:]])
    assert kinds(out) == ["pql.handoff"]  # the 3 real invites still qualify
    assert summary.invalid == {"future": [2]} and "ahead of its receivedAt" in err


def test_an_event_whose_sent_at_shows_the_skew_is_corrected():
    real = _invites()
    wrong = _ahead(real[2], at(hours=2, seconds=1), sent_ahead=True)  # third invite, from the wrong clock
    out, summary, _ = run(rules(INVITES), [*real[:2], wrong])
    assert kinds(out) == ["pql.handoff"] and summary.clock_corrected == 1
    assert out[0]["data"]["qualified_at"] == at(hours=2).replace("Z", ".000Z")  # received - (sentAt - timestamp)


def test_without_received_at_the_callers_clock_is_the_reference():
    e = parse_event(json.dumps(track("X", at(days=400))))
    assert check_future(e, None, HOUR) is False  # nothing to compare with: kept
    with pytest.raises(InvalidEvent) as bad:
        check_future(parse_event(json.dumps(track("X", at(days=400)))), parse_ms(at()), HOUR)
    assert bad.value.reason == "future" and "when it was read" in bad.value.detail
    assert check_future(parse_event(json.dumps(track("X", at(minutes=59)))), parse_ms(at()), HOUR) is False


def test_the_live_router_and_replay_read_payloads_the_same_way():
    """Same payloads (numeric strings, no timestamp, a year-ahead clock corrected or refused): the
    router's lines carry the events replay applies, with the same times, and refuse the same ones."""
    now = parse_ms(at(days=1))
    corrected = _ahead(track("Invite Sent", at(hours=5), email="c@x.io"), at(hours=5, seconds=1), sent_ahead=True)
    refused = _ahead(track("Invite Sent", at(hours=6), email="r@x.io"), at(hours=6), sent_ahead=False)
    no_ts = track("Invite Sent", at(hours=7), email="n@x.io")
    no_ts["originalTimestamp"] = no_ts.pop("timestamp")
    unread = track("Invite Sent", at(days=30), email="u@x.io")  # no receivedAt: the reading clock decides
    docs = [group("acme", at(), employees="4500"), corrected, refused, no_ts, unread]
    router = Router(Engine(EXAMPLE), Topics.of(Settings()), 4, clock=lambda: now)
    batch = Batch()
    for d in docs:
        router.route(json.dumps(d).encode(), batch)
    live = {}
    for body in (b for lines in batch.envelopes.values() for b in envelope.pack_all(lines)):
        for kind, _, raw in envelope.unpack(body):
            if kind in (identity.EVENT, identity.USER):  # what `detect` parses
                e = envelope.decode(kind, raw)
                live[e.messageId] = e.ms
    assert sorted(r[1] for r in batch.rejects) == ["future", "future"]
    rp = Replay(Engine(EXAMPLE), {}, processed_at=now)
    for n, d in enumerate(docs, 1):
        rp.feed(n, json.dumps(d).encode(), io.StringIO(), io.StringIO())
    assert rp.summary.invalid == {"future": [3, 5]} and rp.summary.clock_corrected == 1
    assert live == {corrected["messageId"]: parse_ms(at(hours=5)), no_ts["messageId"]: parse_ms(at(hours=7)),
                    docs[0]["messageId"]: parse_ms(at())}


def test_simulated_histories_end_by_now(tmp_path):
    """`pql simulate --days 56` on 2026-12-06 would run into January from its default start."""
    from datetime import datetime, timezone

    from streams.tools.simulate import START, start_by_now

    day = 86_400_000
    now = datetime(2026, 12, 6, 11, 0, tzinfo=timezone.utc)
    assert start_by_now(7 * day, now) == START  # ends 2026-11-23: as before
    start = start_by_now(56 * day, now)
    assert start.timestamp() * 1000 + 56 * day == datetime(2026, 12, 6, tzinfo=timezone.utc).timestamp() * 1000
    from click.testing import CliRunner

    from streams.tools.cli import main

    out = tmp_path / "e.jsonl"
    res = CliRunner().invoke(main, ["simulate", "--days", "56", "--events", "500", "--out", str(out)])
    assert res.exit_code == 0, res.output
    times = [json.loads(x)["timestamp"] for x in out.read_text().splitlines() if '"timestamp":"' in x
             and x.startswith("{") and x.endswith("}")]
    assert max(parse_ms(t) for t in times if t[:2] == "20") <= datetime.now(timezone.utc).timestamp() * 1000
