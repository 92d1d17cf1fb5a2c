"""A corpus written from the public Segment and RudderStack spec pages (their field lists and
types, every call type, full `context`, `integrations`, `channel`, `_metadata`; our own words and
values): each payload is accepted, attributed and counted as the spec means it, by replay and by
the live router alike. The files: tests/fixtures/spec/."""
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from detectors.engine import Engine
from schemas.events import parse_event
from schemas.rules import load_rules
from streams.config import Settings
from streams.tools.replay import replay
from streams.topics import Topics
from streams.worker.route import Batch, Router

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests/fixtures/spec"
RULES = load_rules(ROOT / "examples/rules.yaml")


def _lines(name: str) -> list[bytes]:
    return (CORPUS / f"{name}.jsonl").read_bytes().splitlines()


def _replay(name: str):
    out = io.StringIO()
    summary = replay(_lines(name), Engine(RULES), {}, out, io.StringIO(), milestones=True)
    return [json.loads(x) for x in out.getvalue().splitlines()], summary


@pytest.mark.parametrize("name", ["segment", "rudderstack"])
def test_every_payload_is_accepted_and_counted_by_its_type(name):
    lines = _lines(name)
    types = Counter(json.loads(x)["type"] for x in lines)
    assert set(types) == {"track", "page", "screen", "identify", "group", "alias"}  # every call type
    _, summary = _replay(name)
    assert summary.invalid == {} and summary.by_type == types
    assert summary.unattributed == 0 and summary.held == 0  # every event a rule hears reaches its account
    for raw in lines:  # what the spec carries beside what we use is kept, not refused
        doc, event = json.loads(raw), parse_event(raw)
        for key in ("context", "integrations", "channel", "_metadata", "rudderId", "request_ip", "version"):
            if key in doc and key != "context":
                assert (event.model_extra or {})[key] == doc[key]
    batch, router = Batch(), Router(Engine(RULES), Topics.of(Settings()), 4, clock=lambda: 1_900_000_000_000)
    for raw in lines:  # the live path: no reject either
        router.route(raw, batch)
    assert batch.rejects == [] and batch.consumed == types


def test_segment_payloads_qualify_their_account_as_the_spec_means():
    out, summary = _replay("segment")
    (handoff,) = [o for o in out if o["type"] == "pql.handoff"]
    d = handoff["data"]
    assert handoff["subject"] == "grp_7Qx2" and d["account_name"] == "Northwind Labs"
    # employees is a String in the Segment spec: "4500" passes `gte: 10`
    assert d["fit"] == {"passed": True, "traits": {"employees": "4500"}}
    # three invites: one naming the account, one from the server naming none (its user's group call
    # decides), one sent anonymously before the visitor identified (identify joins it, group attributes it)
    assert [e["messageId"] for e in d["evidence"]["team_invites"]] == ["seg-004", "seg-005", "seg-006"]
    assert d["qualified_at"] == "2026-10-06T15:00:00.000Z"
    milestones = {o["data"]["milestone"]: o["data"] for o in out if o["type"] == "pql.milestone"}
    # an iOS call without `timestamp`, its device clock 2 h fast: receivedAt - (sentAt - originalTimestamp)
    assert milestones["usage_limit"]["reached_at"] == "2026-10-07T08:32:02.000Z"
    assert milestones["usage_limit"]["evidence"][0]["properties"] == {"properties.used": "850", "properties.limit": "1000"}
    assert milestones["crm_integration"]["evidence"][0]["messageId"] == "seg-011"
    # the two later qualifications fall in its cooldown: the first is published, the second muted
    assert summary.suppressed == {"cooldown": 1} and summary.muted == 1 and summary.handoffs == 1


def test_rudderstack_payloads_qualify_their_account_as_the_spec_means():
    out, summary = _replay("rudderstack")
    (handoff,) = [o for o in out if o["type"] == "pql.handoff"]
    d = handoff["data"]
    assert handoff["subject"] == "acc_88" and d["account_name"] == "Orbital Analytics"
    assert sorted(d["milestones"]) == ["activation", "usage_limit"] and d["score"] == 100
    # the workflow's last step came as a collector writes it, with originalTimestamp and no timestamp
    assert [e["messageId"] for e in d["evidence"]["activation"]] == ["rs-004", "rs-005", "rs-006"]
    assert d["evidence"]["activation"][2]["timestamp"] == "2026-11-03T09:30:00.000Z"
    assert d["evidence"]["usage_limit"][0]["properties"] == {"properties.used": "95", "properties.limit": 100}
    assert d["fit"]["traits"] == {"employees": 120}
