"""Hostile input gets a reason and never more than a bounded footprint (the live figures:
benchmarks/hostile.py, benchmarks/RELIABILITY.md)."""
import json

import pytest

from detectors.engine import Engine
from detectors.milestones import _number
from schemas.events import InvalidEvent, parse_event
from streams.config import Settings
from streams.topics import Topics
from streams.worker import dlq
from streams.worker.route import Batch, Router
from helpers import rules

TOPICS = Topics.of(Settings())
GOOD = {"type": "track", "event": "Usage Recorded", "messageId": "m1", "timestamp": "2026-11-20T00:00:00Z",
        "userId": "u1", "context": {"groupId": "acme"}, "properties": {"used": 90, "limit": 100}}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(constant):
    raw = json.dumps(GOOD).replace("90", constant)
    with pytest.raises(InvalidEvent) as err:
        parse_event(raw.encode())
    assert err.value.reason == "not_json" and constant in err.value.detail


def test_the_words_nan_and_infinity_in_strings_are_fine():
    assert parse_event(json.dumps({**GOOD, "properties": {"note": "NaN or Infinity"}}).encode())


def test_a_non_finite_number_never_passes_a_ratio():
    assert _number(float("nan")) is None and _number(float("inf")) is None and _number(3) == 3.0


def router() -> Router:
    return Router(Engine(rules({"m": {"event": "Usage Recorded", "points": 60}})), TOPICS, 4, max_bytes=2048)


def test_a_record_over_the_size_limit_is_rejected_as_too_large():
    r, batch = router(), Batch()
    big = json.dumps({**GOOD, "properties": {"blob": "x" * 5000}}).encode()
    r.route(big, batch)
    r.route_response(b'{"note":"' + b"y" * 5000 + b'"}', batch)
    r.route(json.dumps(GOOD).encode(), batch)
    assert [(reason, detail.split(";")[0]) for _, reason, detail in batch.rejects] == [
        ("too_large", f"{len(big):,} bytes"), ("too_large", "5,011 bytes")]
    assert sum(len(v) for v in batch.envelopes.values()) == 1  # the good one went on


def test_the_dlq_keeps_the_head_of_a_huge_record_and_says_how_long_it_was():
    value, headers = dlq.record(b"z" * (dlq.KEEP + 10), "product.events", 2, 41, "too_large", "1 MB")
    h = dict(headers)
    assert len(value) == dlq.KEEP and h["pql.error.size"] == str(dlq.KEEP + 10).encode()
    assert h["pql.error.reason"] == b"too_large" and h["pql.error.offset"] == b"41"
    value, headers = dlq.record(b"short", "product.events", 0, 1, "not_json", "x")
    assert value == b"short" and "pql.error.size" not in dict(headers)


def test_pql_publish_keys_a_deeply_nested_line_without_crashing():
    from streams.tools.simulate import key_of

    assert key_of(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}") is None
    assert key_of(json.dumps(GOOD).encode()) == b"acme"


@pytest.mark.parametrize("field", ["messageId", "userId", "anonymousId", "context.groupId"])
def test_an_id_longer_than_the_limit_is_an_invalid_field_named(field):
    doc = {"type": "track", "event": "Invite Sent", "messageId": "m", "timestamp": "2026-11-20T10:00:00Z"}
    if field == "context.groupId":
        doc["context"] = {"groupId": "g" * 257}
    else:
        doc[field] = "x" * 257
    with pytest.raises(InvalidEvent) as bad:
        parse_event(json.dumps(doc))
    assert bad.value.reason == "invalid_field" and field in bad.value.detail
    doc[field.split(".")[-1] if field != "context.groupId" else "context"] = (
        {"groupId": "g" * 256} if field == "context.groupId" else "x" * 256)
    parse_event(json.dumps(doc))  # at the limit: fine


def test_a_long_evidence_value_is_kept_short_in_state():
    from helpers import at, event, track

    r = rules({"inv": {"event": "Invite Sent", "where": {"properties.note": {"exists": True}}, "points": 60}})
    state, _ = Engine(r).observe(None, event(track("Invite Sent", at(), note="n" * 50_000)), "acme")
    assert len(state.model_dump_json()) < 1_000
    assert state.hits["inv"][0][4]["properties.note"].startswith("nnn")


def test_every_copy_of_one_rejection_has_the_same_id():
    """At-least-once: a rejection written again after a crash carries the same pql.error.id, so a
    DLQ consumer drops repeats; two rejections never share one."""
    first = dict(dlq.record(b"x", "product.events", 2, 41, "not_json", "a")[1])["pql.error.id"]
    again = dict(dlq.record(b"x", "product.events", 2, 41, "not_json", "a")[1])["pql.error.id"]
    assert first == again == b"product.events/2/41"
    ids = {dict(dlq.record(b"x", "app-accounts", 0, 7, "too_late", "", n)[1])["pql.error.id"] for n in range(3)}
    ids |= {dict(dlq.record(b"x", "product.events", 2, 42, "not_json", "")[1])["pql.error.id"]}
    assert len(ids) == 4 and b"app-accounts/0/7/2" in ids
