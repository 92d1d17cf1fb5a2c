"""Format versions (schemas/formats.py): what this release writes carries its version, what an
earlier release wrote is read (migrated), and a newer format stops the worker with a clear message."""
import asyncio
import json

import pytest

from detectors import sales
from schemas import formats
from schemas.formats import FORMAT, NewerFormat, check_headers, readable, version_of, versioned
from schemas.state import AccountState
from streams.worker import detect, envelope
from test_publish import Tx, qualifying_envelope, setup


def test_a_value_carries_the_version_first_and_reads_back_as_before():
    body = AccountState(account_id="acme").model_dump_json().encode()
    v = versioned(body)
    assert v.startswith(b'{"v":%d,' % FORMAT) and version_of(v) == FORMAT and version_of(body) == 0
    assert AccountState.model_validate_json(readable(v, "x")) == AccountState(account_id="acme")
    assert json.loads(versioned(b"{}")) == {"v": FORMAT}
    assert version_of(versioned(b"{}", clock_shaped=True)) == FORMAT


def test_the_version_in_sla_clocks_looks_to_the_release_before_like_a_clock_long_run_out():
    """That release's tick (detectors/sales.due, unchanged) takes it for a clock due at 1 ms with no
    account: it drops it (an account "" has no state) instead of failing on its shape."""
    clocks = json.loads(versioned(json.dumps({"h1": [5_000, "acme"]}).encode(), clock_shaped=True))
    assert sales.due(clocks, 10) == [("v", "")] and sales.due(clocks, 6_000) == [("v", ""), ("h1", "acme")]


def test_a_newer_format_is_refused_naming_it():
    with pytest.raises(NewerFormat, match="the state of account 'acme' has format 9; this release reads formats up to"):
        readable(b'{"v":9,"account_id":"acme"}', "the state of account 'acme'")
    with pytest.raises(NewerFormat, match="format 7"):
        check_headers([("pql-format", b"7")], "an envelope")
    assert check_headers(None, "x") == 0 and check_headers([("other", b"1")], "x") == 0
    assert check_headers(formats.HEADERS, "x") == FORMAT


def test_an_older_value_is_migrated_on_read(monkeypatch):
    monkeypatch.setattr(formats, "FORMAT", FORMAT + 1)
    monkeypatch.setitem(formats.MIGRATIONS, FORMAT, lambda d: {"account_id": d["account_id"], "traits": {"renamed": d.get("old")}})
    out = json.loads(readable(b'{"v":%d,"account_id":"a","old":3}' % FORMAT, "x"))
    assert out["traits"] == {"renamed": 3} and "old" not in out
    assert json.loads(readable(b'{"account_id":"a"}', "x")) == {"account_id": "a", "traits": {"renamed": None}}  # 0 -> 1 -> 2


def test_the_worker_writes_versions_into_every_table_value_and_envelope():
    tx = Tx()
    tables, detector, pub = setup(tx)
    p = envelope.partition_of("acme", 4)
    assert asyncio.run(pub.publish(asyncio.run(detector.process(qualifying_envelope("acme"), p)), p, 0))
    asyncio.run(pub.flush(None))
    changelog = [v for s, v in zip(tx.sent, tx.values) if s[0].endswith("-changelog")]
    assert changelog and all(version_of(v) == FORMAT for v in changelog)
    assert all(version_of(v) == FORMAT for t in (tables.accounts, tables.clocks) for v in t.data.values())


def test_a_worker_meeting_a_newer_envelope_or_state_stops(monkeypatch):
    from types import SimpleNamespace

    stopped = []

    def refuse(err):
        stopped.append(str(err))
        raise SystemExit(78)

    monkeypatch.setattr(detect, "refuse", refuse)
    tables, detector, pub = setup(Tx())
    agent = detect.Agent(detector, pub, SimpleNamespace(lock=asyncio.Lock()), None)
    p = envelope.partition_of("acme", 4)
    m = SimpleNamespace(headers=[("pql-format", b"9")], offset=3, topic="app-accounts", partition=p, tp=None)
    with pytest.raises(SystemExit):
        asyncio.run(agent.envelope(SimpleNamespace(message=m, value=qualifying_envelope("acme")), set()))
    assert f"envelope 3 of app-accounts partition {p} has format 9" in stopped[0]
    tables.accounts.data["acme"] = b'{"v":9,"account_id":"acme"}'
    m.headers = formats.HEADERS
    with pytest.raises(SystemExit):
        asyncio.run(agent.envelope(SimpleNamespace(message=m, value=qualifying_envelope("acme")), set()))
    assert "the state of account 'acme' has format 9" in stopped[1]
