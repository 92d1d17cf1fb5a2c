"""Upgrades: a worker of this release reads what the release before it left in the topics.

tests/fixtures/upgrade/<release>/ holds, from that release's own code (its make.py), the changelogs
halfway through a history and the envelopes of the second half, routed but not processed. This
release recovers those tables, processes those envelopes, and must publish exactly what a fresh run
of this release over the whole history publishes (tests/pipeline.py runs the worker's code path).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from schemas.formats import FORMAT, version_of
from schemas.rules import load_rules
from pipeline import Pipeline

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "upgrade"
RELEASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").exists())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(rows: list[dict]) -> list[tuple[str, str, bytes]]:
    return [(r["topic"], r["key"], r["value"].encode()) for r in rows]


@pytest.mark.parametrize("release", RELEASES)
def test_a_worker_reads_what_the_release_before_left_and_publishes_what_a_fresh_run_does(release):
    d = FIXTURES / release
    meta = json.loads((d / "meta.json").read_text())
    rules = load_rules(d / "rules.yaml")
    lines = gzip.decompress((d / "history.jsonl.gz").read_bytes()).splitlines()
    half, batch, n = meta["half"], meta["batch"], meta["partitions"]

    fresh = Pipeline(rules, n)
    for k in range(0, half, batch):
        fresh.run(fresh.route(lines[k:min(k + batch, half)]))
    fresh.tick(meta["mid_tick"])
    before = outputs(jsonl(d / "outputs.jsonl"))
    assert fresh.outputs() == before  # the first half: the same decisions, byte for byte

    changelog = {(r["table"], r["key"]): r["value"].encode() for r in jsonl(d / "changelog.jsonl")}
    upgraded = Pipeline(rules, n, changelog=changelog)  # a worker of this release, recovered from them
    upgraded.run([(r["partition"], r["body"].encode()) for r in jsonl(d / "envelopes.jsonl")])
    upgraded.tick(meta["end_tick"])

    fresh.run([e for k in range(half, len(lines), batch) for e in fresh.route(lines[k:k + batch])])
    fresh.tick(meta["end_tick"])
    assert len(fresh.outputs()) > len(before) > 0
    assert before + upgraded.outputs() == fresh.outputs()
    written = upgraded.changelog()  # what it wrote carries this release's format
    assert written and all(version_of(v) == FORMAT for v in written.values())
